"The components the tutorials add (tutorials/extensions/: Mistral in 2 files, ConvNeXt in 1) train, save and load."
import os, sys
from pathlib import Path

import pytest
import torch
import transformers

os.environ.setdefault('DS_ACCELERATOR', 'cpu')
transformers.utils.logging.disable_progress_bar()
EXT = Path(__file__).resolve().parents[1] / 'tutorials' / 'extensions'
sys.path.insert(0, str(EXT))

from tinyllava_nb.model.tinyllava import load_pretrained
from tinyllava_nb.toy import toy_tokenizer
from tinyllava_nb.world import make_world
from tinyllava_nb.train.run import parse_args, train

QUIET = ['--use_cpu', 'true', '--report_to', 'none', '--disable_tqdm', 'true', '--per_device_train_batch_size', '4',
         '--tune_type_llm', 'full', '--learning_rate', '3e-3', '--max_steps', '12']


def test_file_counts():
    assert sorted(p.name for p in EXT.glob('mistral_*.py')) == ['mistral_llm.py', 'mistral_template.py']
    assert [p.name for p in EXT.glob('convnext_*.py')] == ['convnext_tower.py']


def _losses(trainer): return [h['loss'] for h in trainer.state.log_history if 'loss' in h]


def test_mistral_in_two_files_trains(tmp_path):
    import mistral_llm
    from tinyllava_nb.data.template import fuzz_templates
    assert fuzz_templates(100, names=['mistral'], families=['llama']) == 200
    tok = mistral_llm.pad_with_unk(toy_tokenizer('llama'))
    cfg = transformers.MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    transformers.MistralForCausalLM(cfg).save_pretrained(tmp_path / 'mistral'); tok.save_pretrained(tmp_path / 'mistral')
    data = make_world(tmp_path / 'data', n_train=16, n_eval=4)
    trainer = train(*parse_args(['--model_name_or_path', str(tmp_path / 'mistral'), '--data_path', str(data['finetune']),
                                 '--image_folder', str(data['root']), '--output_dir', str(tmp_path / 'run')] + QUIET))
    losses = _losses(trainer)
    assert losses[-1] < losses[0] * 0.8, losses
    model, _, _ = load_pretrained(tmp_path / 'run')
    assert type(model.language_model).__name__ == 'MistralForCausalLM'


def test_convnext_in_one_file_trains(tmp_path):
    import convnext_tower  # noqa: F401
    cfg = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, patch_size=4, image_size=32)
    transformers.ConvNextModel(cfg).save_pretrained(tmp_path / 'convnext')
    transformers.ConvNextImageProcessorPil(size={'shortest_edge': 32}, crop_pct=1.0).save_pretrained(tmp_path / 'convnext')
    data = make_world(tmp_path / 'data', n_train=16, n_eval=4)
    trainer = train(*parse_args(['--vision_tower', str(tmp_path / 'convnext'), '--mm_vision_select_layer', '-1',
                                 '--mm_vision_select_feature', 'cls_patch', '--data_path', str(data['finetune']),
                                 '--image_folder', str(data['root']), '--output_dir', str(tmp_path / 'run')] + QUIET))
    losses = _losses(trainer)
    assert losses[-1] < losses[0] * 0.8, losses
    model, _, _ = load_pretrained(tmp_path / 'run')
    assert type(model.vision_tower).__name__ == 'ConvNextVisionTower' and model.num_image_tokens == 16
    with torch.no_grad():     # the frozen tower did not change
        ref = transformers.ConvNextModel.from_pretrained(tmp_path / 'convnext')
        for (n, a), (_, b) in zip(model.vision_tower._vision_tower.state_dict().items(), ref.state_dict().items()):
            assert torch.equal(a, b), n
