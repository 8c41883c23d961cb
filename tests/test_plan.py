"`plan`: exact parameter counts of published combinations, DeepSpeed's memory arithmetic, tokens as the dataset counts them."
import os, subprocess
from pathlib import Path
import pytest
from tinyllava_nb.train.plan import (count_params, largest_layer, meta_model, model_state_bytes, plan, published_config,
                                     sample_flops, stored_configs)
from tinyllava_nb.train.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
SIGLIP = 'google/siglip-so400m-patch14-384'

@pytest.mark.parametrize('llm,total', [('microsoft/phi-2', 3_217_417_280),        # TinyLLaVA-Phi-2-SigLIP-"3.1B"
                                       ('google/gemma-2b', 2_940_955_712),        # TinyLLaVA-Gemma-SigLIP-"2.4B"
                                       ('Qwen/Qwen2-0.5B', 924_095_168)])
def test_published_combinations_count_exactly(llm, total):
    model = meta_model(llm, SIGLIP)
    counts = count_params(model, Recipe(llm='full', connector='full'))
    assert counts['all']['total'] == total
    assert counts['vision_tower'] == dict(total=428_225_600, trainable=0)
    h = published_config(llm).hidden_size
    assert counts['connector']['total'] == 1152 * h + h + h * h + h          # mlp2x_gelu

def test_every_shipped_config_builds_on_meta():
    for name in stored_configs():
        cfg = published_config(name, vision='siglip' in name)
        assert cfg.model_type

@pytest.mark.parametrize('gpus', [1, 4, 8])
def test_model_states_are_deepspeeds_when_everything_trains(gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    model = meta_model('Qwen/Qwen2.5-0.5B', SIGLIP)
    n, big = count_params(model)['all']['total'], largest_layer(model)
    assert model_state_bytes(n, n, gpus, 2) == estimate_zero2_model_states_mem_needs(n, gpus, cpu_offload=False)[1]
    assert model_state_bytes(n, n, gpus, 3, big) == estimate_zero3_model_states_mem_needs(n, big, gpus, cpu_offload=False)[1]
    assert model_state_bytes(n, n // 2, gpus, 3, big) < model_state_bytes(n, n, gpus, 3, big)   # frozen parts: 2 bytes

def test_flops_count_the_trained_parts_three_times():
    model = meta_model('toy:qwen2', 'toy:siglip')
    frozen, full = (count_params(model, Recipe(llm=t, connector='full')) for t in ('frozen', 'full'))
    assert sample_flops(model, full, 50, 1) > sample_flops(model, frozen, 50, 1) > 0

def test_tokens_are_the_datasets(tmp_path):
    from tinyllava_nb.data.dataset import LazySupervisedDataset
    from tinyllava_nb.data.image import ImagePreprocess
    from tinyllava_nb.model.llm import load_tokenizer
    from tinyllava_nb.world import make_world
    world = make_world(tmp_path / 'world', n_train=16, n_eval=4)
    p = plan([str(ROOT / 'configs/toy_pretrain.yaml'), '--data_path', str(world['finetune']), '--image_folder',
              str(world['root']), '--conv_version', 'phi', '--output_dir', str(tmp_path / 'out')], gpus=2, gpu='l4')
    model = meta_model('toy:phi', 'toy:siglip')
    ds = LazySupervisedDataset(world['finetune'], load_tokenizer('toy:phi'), 'phi', world['root'],
                               ImagePreprocess(model.vision_tower.processor_for(model.config.vision_config)),
                               model.num_image_tokens)
    assert (p['text_tokens'] + p['image_tokens'], p['samples']) == (sum(ds.lengths), len(ds))
    assert p['steps_per_epoch'] == -(-len(ds) // (8 * 1 * 2)) and p['hours'] > 0

def test_plan_command_offline_in_seconds():
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'DS_ACCELERATOR': 'cpu'}
    r = subprocess.run(['tinyllava-nb', 'plan', '--gpus', '4', '--gpu', 'a100', '--gpu-memory', '40', '--samples', '665298',
                        '--text-tokens', '200', 'configs/finetune_phi2_siglip.yaml'], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'all             3,217,417,280   2,789,191,680' in r.stdout
    assert 'ZeRO-0: model states   56.6 GB' in r.stdout and 'does NOT fit' in r.stdout and '<- the config' in r.stdout
    assert '665,298 samples assumed 200 text tokens + one image each' in r.stdout and 'h on 4 x a100 at 20% MFU' in r.stdout

def test_stated_text_tokens_and_fsdp():
    "Without the data file: --text-tokens per sample (activations still at model_max_length); FSDP plans as ZeRO-3."
    cfg = str(ROOT / 'configs/finetune_phi2_siglip.yaml')
    bound = plan([cfg], gpus=4, gpu='a100', samples=1000)
    stated = plan([cfg], gpus=4, gpu='a100', samples=1000, text_tokens=200)
    assert stated['text_tokens'] == 200 * 1000 and stated['image_tokens'] == 728 * 1000      # 'patch': 27² - 1
    assert bound['text_tokens'] == (2048 - 728) * 1000 and stated['activations'] == bound['activations']
    assert stated['flops'] < bound['flops']
    assert stated['hours'] == pytest.approx(stated['flops'] / (4 * 312e12 * 0.2 * 3600))   # at 20 % of 4 A100s
    fsdp = plan([cfg, str(ROOT / 'configs/fsdp.yaml')], gpus=4, gpu='a100', samples=1000, text_tokens=200)
    assert (fsdp['zero_stage'], fsdp['activations'], fsdp['flops']) == (3, stated['activations'], stated['flops'])
    no_reshard = plan([cfg, '--fsdp', '--fsdp_config', '{"reshard_after_forward": false}', '--deepspeed', ''], gpus=4)
    assert no_reshard['zero_stage'] == 2

def test_tinyllava_reported_hours_imply_one_mfu_across_llms():
    "TinyLLaVA's stage-2 hours at 200 text tokens a sample: the implied MFUs agree within a few points."
    cfg = str(ROOT / 'configs/finetune_phi2_siglip.yaml')
    reported = {'TinyLlama/TinyLlama-1.1B-Chat-v1.0': 6.5, 'microsoft/phi-2': 14}   # hours on 4 x A100-40G, from
    # https://github.com/TinyLLaVA/TinyLLaVA_Factory/issues/67
    mfu = [plan([cfg, '--model_name_or_path', llm], gpus=4, gpu='a100', mfu=1.0, samples=665_298,
                text_tokens=200)['hours'] / h for llm, h in reported.items()]
    assert all(0.12 < m < 0.25 for m in mfu) and abs(mfu[0] - mfu[1]) < 0.03, mfu
