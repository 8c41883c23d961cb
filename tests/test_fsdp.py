"FSDP2 with two CPU processes: the losses of one process, a saved model with the sharded model's logits, resume."
import json
import pytest, torch
from test_train import DS_SCRIPT, QUIET, ROOT, data, fixed_batch, losses, two_processes   # data: the fixture
from tinyllava_nb.model.tinyllava import load_pretrained
from tinyllava_nb.train.run import check_args, parse_args, train

# accelerate turns FSDP on only for processes on GPUs; this grants it to CPU processes (gloo), and everything after
# it is the path a GPU run takes: the Trainer's FSDP2 wrapping, sharded optimizer, gathered saves and resume.
CPU_FSDP = '''
import accelerate.state as S
from accelerate.utils import DistributedType
_init = S.AcceleratorState.__init__
def _init_with_fsdp_on_cpu(self, *a, fsdp_plugin=None, **kw):
    _init(self, *a, fsdp_plugin=fsdp_plugin, **kw)
    plugin = fsdp_plugin or getattr(self, 'fsdp_plugin', None)
    if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin
S.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
'''
MODULES = '''
if trainer.is_world_process_zero():                # what FSDP wrapped: the classes of the live model's modules
    kinds = sorted({type(m).__name__ for m in trainer.model_wrapped.modules()})
    open(os.path.join(trainer.args.output_dir, 'modules.json'), 'w').write(json.dumps(kinds))
'''
# the shipped configs/fsdp.yaml (FSDP's activation checkpointing), and the bare flag
RECIPES = {'full': [str(ROOT / 'configs/fsdp.yaml'), '--tune_type_llm', 'full', '--learning_rate', '3e-3'],
           'lora+partial': ['--fsdp', '--tune_type_llm', 'lora', '--lora_r', '8', '--lora_alpha', '16', '--lora_dropout', '0',
                            '--tune_type_vision_tower', 'partially-tune', '--tune_vision_tower_from_layer', '1',
                            '--learning_rate', '1e-2']}

def run_fsdp(tmp_path, data, *flags):
    "Train with FSDP in two CPU processes of batch 2 (a global batch of 4); the script saves the live model's logits."
    yaml = [f for f in flags[:1] if f.endswith('.yaml')]                   # a config comes before the flags
    return two_processes(tmp_path, data, *yaml, '--data_path', str(data['finetune']), '--image_folder', str(data['root']),
                         '--conv_version', 'phi', '--image_aspect_ratio', 'pad', *QUIET,
                         '--per_device_train_batch_size', '2', *flags[len(yaml):], script=CPU_FSDP + DS_SCRIPT + MODULES)

@pytest.mark.parametrize('recipe', RECIPES)
def test_fsdp_equals_one_process(recipe, data, tmp_path):
    "16 samples, 4 steps of 4 (one epoch, the same order): two sharded processes train as one process does."
    flags = RECIPES[recipe] + ['--max_steps', '4', '--output_dir']
    run_fsdp(tmp_path, data, *flags, str(tmp_path / 'fsdp'))
    one_flags = [f for f in RECIPES[recipe] if not f.endswith('.yaml') and f != '--fsdp'] + ['--max_steps', '4']
    one = train(*parse_args(['--data_path', str(data['finetune']), '--image_folder', str(data['root']),
                             '--conv_version', 'phi', '--image_aspect_ratio', 'pad', '--output_dir', str(tmp_path / 'one'),
                             *QUIET, *one_flags]))
    kinds = json.loads((tmp_path / 'fsdp' / 'modules.json').read_text())
    root = 'FSDPPeftModel' if 'lora' in recipe else 'FSDPTinyLlavaForConditionalGeneration'
    assert 'FSDPPhiDecoderLayer' in kinds and root in kinds, kinds            # a shard group per layer
    assert ('FSDPCheckpointWrapper' in kinds) == (recipe == 'full'), kinds      # fsdp.yaml's activation checkpointing
    torch.testing.assert_close(losses(tmp_path / 'fsdp'), losses(tmp_path / 'one'), atol=1e-4, rtol=1e-5)
    sharded = torch.load(tmp_path / 'fsdp' / 'final_logits.pt')                 # the live FSDP model's logits
    model, tok, _ = load_pretrained(tmp_path / 'fsdp')                           # LoRA: the base plus the adapter
    one_model = one.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**fixed_batch(model, tok, data)).logits, sharded, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(one_model(**fixed_batch(one_model, tok, data)).logits, sharded, atol=1e-3, rtol=1e-3)

def test_fsdp_checkpoints_resume(data, tmp_path):
    out = tmp_path / 'fsdp'
    common = RECIPES['full'] + ['--output_dir', str(out), '--save_strategy', 'steps', '--save_steps', '2']
    run_fsdp(tmp_path, data, *common, '--max_steps', '4')
    assert sorted(p.name for p in out.glob('checkpoint-*')) == ['checkpoint-2', 'checkpoint-4']
    assert all((out / 'checkpoint-4' / f).exists() for f in ('model.safetensors', 'pytorch_model_fsdp.bin', 'optimizer.bin'))
    r = run_fsdp(tmp_path, data, *common, '--max_steps', '6', '--resume_from_checkpoint', 'auto')
    assert f'resuming from {out / "checkpoint-4"}' in r.stdout and len(losses(out)) == 6

def test_fsdp_refusals(data, tmp_path):
    args = ['--data_path', str(data['finetune']), '--output_dir', str(tmp_path), '--use_cpu', 'true', '--fsdp']
    with pytest.raises(ValueError, match='does not run under fsdp'): check_args(*parse_args(args + ['--tune_type_llm', 'qlora']))
    with pytest.raises(ValueError, match='fsdp and deepspeed are both set'):
        check_args(*parse_args(args + ['--deepspeed', str(ROOT / 'configs/zero2.json')]))
    _, _, t = parse_args([str(ROOT / 'configs/finetune_phi2_siglip.yaml'), str(ROOT / 'configs/fsdp.yaml'), '--use_cpu', 'true'])
    assert t.deepspeed is None and t.fsdp and t.fsdp_plugin_args['reshard_after_forward'] is True
