"Training end to end: the CLI's two stages, DeepSpeed ZeRO-2/3 with 2 processes, LoRA, QLoRA, resume, checks."
import json, os, socket, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
import transformers
os.environ.setdefault('DS_ACCELERATOR', 'cpu')
transformers.utils.logging.disable_progress_bar()
from transformers import TrainerCallback
from tinyllava_nb.world import make_world
from tinyllava_nb.model.tinyllava import load_pretrained
from tinyllava_nb.train import run
from tinyllava_nb.train.run import check_args, merge_lora, parse_args, train

ROOT = Path(__file__).resolve().parents[1]
QUIET = ['--use_cpu', 'true', '--report_to', 'none', '--disable_tqdm', 'true', '--per_device_train_batch_size', '4']

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp('data'), n_train=16, n_eval=4)

def losses(out_dir):
    return [h['loss'] for h in json.loads((Path(out_dir) / 'trainer_state.json').read_text())['log_history'] if 'loss' in h]

def fixed_batch(model, tok, data):
    from tinyllava_nb.data.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
    from tinyllava_nb.data.image import ImagePreprocess
    proc = model.vision_tower.image_processor
    ds = LazySupervisedDataset(data['finetune'], tok, 'phi', data['root'], ImagePreprocess(proc, 'pad'), model.num_image_tokens)
    return DataCollatorForSupervisedDataset(tok)([ds[i] for i in range(3)])

def test_cli_pretrain_then_finetune(data, tmp_path):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    common = ['--image_folder', str(data['root'])] + QUIET
    r = subprocess.run(['tinyllava-nb', 'train', str(ROOT / 'configs/toy_pretrain.yaml'), '--data_path', str(data['pretrain']),
                        '--output_dir', str(tmp_path / 'pre'), '--max_steps', '12'] + common, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run(['tinyllava-nb', 'train', str(ROOT / 'configs/toy_finetune.yaml'), '--data_path', str(data['finetune']),
                        '--pretrained_model_path', str(tmp_path / 'pre'), '--output_dir', str(tmp_path / 'fin'), '--max_steps', '20'] + common,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ls = losses(tmp_path / 'fin')
    assert sum(ls[-4:]) / 4 < sum(ls[:4]) / 4 * 0.8, ls
    model, tok, proc = load_pretrained(tmp_path / 'fin')
    assert model.config.conv_version == 'phi'                  # the template it was trained with, saved with it
    from PIL import Image
    from tinyllava_nb.data.image import ImagePreprocess
    from tinyllava_nb.data.template import TemplateFactory
    sample = json.loads(data['finetune'].read_text())[0]
    ids = TemplateFactory('phi')().encode(sample['conversations'], tok, mode='infer')['input_ids'][None]
    img = ImagePreprocess(proc, 'pad')(Image.open(data['root'] / sample['image']))[None]
    out = model.generate(ids, images=img, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape == (1, 4)

DS_SCRIPT = textwrap.dedent('''
    import os, sys, json, torch
    os.environ.setdefault('DS_ACCELERATOR', 'cpu')
    from tinyllava_nb.train.run import main
    sys.path.insert(0, sys.argv[1])
    from test_train import fixed_batch
    data = {k: __import__('pathlib').Path(v) for k, v in json.loads(sys.argv[2]).items()}
    trainer = main(sys.argv[3:])
    assert trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled, 'DeepSpeed (or FSDP) was silently dropped'
    batch = fixed_batch(trainer.model, trainer.processing_class, data)
    engine = trainer.model_wrapped                 # under ZeRO-3 / FSDP its forward gathers the sharded weights
    engine.eval()
    with torch.no_grad(): logits = engine(**batch).logits
    if trainer.is_world_process_zero(): torch.save(logits, os.path.join(trainer.args.output_dir, 'final_logits.pt'))
''')

def two_processes(tmp_path, data, *flags, script: str = DS_SCRIPT):
    "Run `script` (DS_SCRIPT by default) under torchrun in two CPU processes with the run's `flags`; assert it ends well."
    path = tmp_path / 'train_2proc.py'; path.write_text(script)
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != 'ACCELERATE_USE_CPU'} | {'OMP_NUM_THREADS': '1'}
    r = subprocess.run(['torchrun', '--nproc_per_node', '2', '--master_port', str(port), str(path),
                        str(Path(__file__).parent), json.dumps({k: str(v) for k, v in data.items()}), *flags],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    return r

@pytest.mark.parametrize('stage', [2, 3])
def test_deepspeed_two_processes(stage, data, tmp_path):
    out = tmp_path / f'zero{stage}'
    two_processes(tmp_path, data, '--data_path', str(data['finetune']), '--image_folder', str(data['root']),
                  '--conv_version', 'phi', '--tune_type_llm', 'full', '--learning_rate', '3e-3', '--max_steps', '12',
                  '--output_dir', str(out), '--deepspeed', str(ROOT / f'configs/zero{stage}.json'),
                  '--image_aspect_ratio', 'pad', *QUIET)
    ls = losses(out)
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3, ls
    model, tok, _ = load_pretrained(out)                                  # a fresh process's view: the saved files
    with torch.no_grad(): logits = model(**fixed_batch(model, tok, data)).logits
    torch.testing.assert_close(logits, torch.load(out / 'final_logits.pt'), atol=1e-4, rtol=1e-4)

def test_zero3_continues_a_saved_stage(data, tmp_path):
    "Stage 2 from stage 1's folder under ZeRO-3 (the published configs' path): the weights load inside zero.Init."
    common = ['--data_path', str(data['finetune']), '--image_folder', str(data['root']), '--conv_version', 'phi',
              '--image_aspect_ratio', 'pad', '--tune_type_llm', 'full', '--learning_rate', '3e-3'] + QUIET
    train(*parse_args(common + ['--max_steps', '3', '--output_dir', str(tmp_path / 'pre')]))
    stage2 = ['--pretrained_model_path', str(tmp_path / 'pre'), '--max_steps', '1']
    one = losses(train(*parse_args(common + stage2 + ['--output_dir', str(tmp_path / 'one')])).args.output_dir)
    # accelerate starts DeepSpeed's process group for GPU processes only; zero.Init (in from_pretrained) needs it
    two_processes(tmp_path, data, *common, *stage2, '--per_device_train_batch_size', '2', '--output_dir',
                  str(tmp_path / 'zero3'), '--deepspeed', str(ROOT / 'configs/zero3.json'),
                  script="import deepspeed; deepspeed.init_distributed(dist_backend='gloo')\n" + DS_SCRIPT)
    assert abs(losses(tmp_path / 'zero3')[0] - one[0]) < 1e-3, (losses(tmp_path / 'zero3'), one)   # stage 1's weights

def test_deepspeed_checkpoints_are_whole_and_resume(data, tmp_path):
    "Both ranks write their shards into the staging folder; checkpoint-N appears whole; auto resumes under ZeRO-3."
    from tinyllava_nb.train.trainer import checkpoints
    out = tmp_path / 'zero3'
    launch = lambda *flags: two_processes(
        tmp_path, data, '--data_path', str(data['finetune']), '--conv_version', 'phi', '--tune_type_llm', 'full',
        '--learning_rate', '3e-3', '--output_dir', str(out), '--save_strategy', 'steps', '--save_steps', '2',
        '--deepspeed', str(ROOT / 'configs/zero3.json'), *QUIET, *flags)
    launch('--max_steps', '4')
    done, torn = checkpoints(out)
    assert [p.name for p in done] == ['checkpoint-2', 'checkpoint-4'] and torn == [] and not list(out.glob('.tmp-*'))
    assert len(list((out / 'checkpoint-4').glob('global_step4/*optim_states.pt'))) == 2       # one shard per rank
    r = launch('--max_steps', '6', '--resume_from_checkpoint', 'auto')
    assert f'resuming from {out / "checkpoint-4"}' in r.stdout
    assert len(losses(out)) == 6 and [p.name for p in checkpoints(out)[0]] == ['checkpoint-2', 'checkpoint-4', 'checkpoint-6']

def test_lora_save_load_merge(data, tmp_path):
    args = ['--data_path', str(data['finetune']), '--conv_version', 'phi', '--tune_type_llm', 'lora', '--lora_r', '8',
            '--lora_alpha', '16', '--learning_rate', '1e-2', '--max_steps', '6', '--output_dir', str(tmp_path / 'lora')] + QUIET
    trainer = train(*parse_args(args))
    assert (tmp_path / 'lora' / 'adapter_config.json').exists() and (tmp_path / 'lora' / 'base' / 'config.json').exists()
    live = trainer.model.eval()
    unmerged, tok, _ = load_pretrained(tmp_path / 'lora', merge_lora=False)
    merged, _, _ = load_pretrained(tmp_path / 'lora')
    assert merged.config.conv_version == 'phi'
    b = fixed_batch(merged, tok, data)
    with torch.no_grad():
        want = live(**b).logits
        torch.testing.assert_close(unmerged(**b).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(**b).logits, want, atol=1e-5, rtol=1e-5)
        plain, _, _ = load_pretrained(merge_lora(tmp_path / 'lora', tmp_path / 'merged'))
        torch.testing.assert_close(plain(**b).logits, want, atol=1e-5, rtol=1e-5)
    assert not (tmp_path / 'merged' / 'adapter_config.json').exists()

def test_qlora_runs_on_cpu(data, tmp_path):
    pytest.importorskip('bitsandbytes')
    args = ['--data_path', str(data['finetune']), '--conv_version', 'phi', '--tune_type_llm', 'qlora', '--lora_r', '8',
            '--learning_rate', '1e-2', '--max_steps', '5', '--output_dir', str(tmp_path / 'qlora')] + QUIET
    trainer = train(*parse_args(args))
    assert any(type(m).__name__ == 'Linear4bit' for m in trainer.model.modules())
    ls = losses(tmp_path / 'qlora')
    assert len(ls) == 5 and all(l == l for l in ls) and ls[-1] < ls[0]

class StopAt(TrainerCallback):
    def __init__(self, step): self.step = step
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step: control.should_save = True; control.should_training_stop = True

def test_resume_matches_uninterrupted_run(data, tmp_path):
    "The tower trains too: its weights are saved under their published names and must be read back by them."
    base = ['--data_path', str(data['finetune']), '--conv_version', 'phi', '--tune_type_llm', 'full', '--learning_rate', '3e-3',
            '--tune_type_vision_tower', 'full', '--image_folder', str(data['root']),
            '--max_steps', '8', '--save_strategy', 'steps', '--save_steps', '4', '--group_by_modality_length', 'true', '--seed', '3'] + QUIET
    train(*parse_args(base + ['--output_dir', str(tmp_path / 'a')]))
    train(*parse_args(base + ['--output_dir', str(tmp_path / 'b')]), callbacks=[StopAt(4)])
    assert len(losses(tmp_path / 'b')) == 4
    train(*parse_args(base + ['--output_dir', str(tmp_path / 'b'), '--resume_from_checkpoint', 'auto']))
    a, b = losses(tmp_path / 'a'), losses(tmp_path / 'b')
    assert len(a) == 8 and len(b) == 8
    torch.testing.assert_close(torch.tensor(b[4:]), torch.tensor(a[4:]), rtol=1e-5, atol=1e-6)

def test_packing_trains_like_padding(data, tmp_path):
    base = ['--data_path', str(data['finetune']), '--conv_version', 'phi', '--tune_type_llm', 'full', '--learning_rate', '3e-3',
            '--max_steps', '6', '--seed', '3', '--image_folder', str(data['root'])] + QUIET
    train(*parse_args(base + ['--output_dir', str(tmp_path / 'pad')]))
    train(*parse_args(base + ['--output_dir', str(tmp_path / 'pack'), '--packing', 'true']))
    torch.testing.assert_close(torch.tensor(losses(tmp_path / 'pack')), torch.tensor(losses(tmp_path / 'pad')), rtol=1e-4, atol=1e-5)

def test_partial_llm_trains_exactly_last_layers():
    from tinyllava_nb.model.tinyllava import toy_tinyllava
    from tinyllava_nb.train.recipe import Recipe, apply_recipe
    model, _, _ = toy_tinyllava('qwen2', 'siglip', 'mlp2x_gelu')
    last = sum(p.numel() for n, p in model.language_model.named_parameters() if '.layers.1.' in n)
    model, table = apply_recipe(model, Recipe('partially-tune', 'frozen', 'frozen', llm_last_layers=1), verbose=False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all('language_model.model.layers.1.' in n for n in names)
    assert table[0]['trainable'] == last

BAD = {   # flags -> what the error must say
    ('--tune_type_vision_tower', 'partially-tune'): 'tune_vision_tower_from_layer',
    ('--tune_type_llm', 'lora', '--tune_type_llm', 'frozen', '--lora_r', '8'): 'every part is frozen',
    ('--conv_version', 'llava_v1'): "unknown template 'llava_v1'",
    ('--vision_tower', 'toy:eva'): "unknown vision tower 'eva'",
    ('--connector_type', 'mlp'): 'needs its depth and activation',
    ('--connector_type', 'mlp2x_swish'): "unknown connector 'mlp2x_swish'",
    ('--data_path', '/no/such/file.json'): 'does not exist',
    ('--tune_type_connector', 'partially-tune'): "cannot be 'partially-tune'",
}

@pytest.mark.parametrize('flags,message', list(BAD.items()), ids=[' '.join(f) for f in BAD])
def test_bad_configs_fail_before_work(flags, message, data, tmp_path, monkeypatch):
    monkeypatch.setattr(run, 'build_model', lambda *a: pytest.fail('a model was built'))
    args = ['--data_path', str(data['finetune']), '--output_dir', str(tmp_path / 'x')] + QUIET + list(flags)
    with pytest.raises((ValueError, KeyError), match=message): train(*parse_args(args))

def test_qlora_without_bitsandbytes(data, tmp_path, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'bitsandbytes' else real(name, *a))
    args = ['--data_path', str(data['finetune']), '--output_dir', str(tmp_path / 'x'), '--tune_type_llm', 'qlora'] + QUIET
    with pytest.raises(ValueError, match='needs bitsandbytes: pip install bitsandbytes'): check_args(*parse_args(args))

def test_existing_model_is_not_overwritten(data, tmp_path):
    (tmp_path / 'out').mkdir(); (tmp_path / 'out' / 'model.safetensors').write_bytes(b'mine')
    args = ['--data_path', str(data['finetune']), '--output_dir', str(tmp_path / 'out')] + QUIET
    with pytest.raises(ValueError, match='already holds a model'): train(*parse_args(args))
    assert (tmp_path / 'out' / 'model.safetensors').read_bytes() == b'mine'
