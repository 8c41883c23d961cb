"`tinyllava-nb bench --gpu` on a CPU at toy size: rows trained by TinyLlavaTrainer + DeepSpeed, arithmetic, refusal."
import json, os, subprocess, sys, textwrap
from pathlib import Path

import pytest
import torch

from tinyllava_nb.bench import FINETUNE, GPU_SETUPS, ZERO2, GpuRow, gpu_name, llava_samples, plan_memory, planned_row
from tinyllava_nb.train.plan import PEAK_BF16, count_params, meta_model

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed leaves a process group behind, so the rows train in a process of their own. A spy on the Trainer's
# `train` records what DeepSpeed set up before the row frees it.
ROWS = textwrap.dedent('''
    import json, sys
    from tinyllava_nb.bench import bench_gpu_row, run_gpu_bench
    from tinyllava_nb.train.trainer import TinyLlavaTrainer
    seen, train = [], TinyLlavaTrainer.train
    def spy(self, *args, **kwargs):
        out, engine = train(self, *args, **kwargs), self.model_wrapped
        opt, nbytes = engine.optimizer, lambda ts: sum(t.numel() * t.element_size() for t in ts)
        moments = [s for st in opt.optimizer.state.values() for k, s in st.items() if k in ('exp_avg', 'exp_avg_sq')]
        seen.append(dict(deepspeed=self.is_deepspeed_enabled, zero=type(opt).__name__,
                         stage=engine.zero_optimization_stage(),
                         micro_batch=engine.train_micro_batch_size_per_gpu(), steps=self.state.global_step,
                         weights=sorted({str(p.dtype) for p in self.model.parameters()}),
                         masters=sorted({str(m.dtype) for m in opt.single_partition_of_fp32_groups}),
                         trained=sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                         master_bytes=nbytes(opt.single_partition_of_fp32_groups), moment_bytes=nbytes(moments)))
        return out
    TinyLlavaTrainer.train = spy
    rows = run_gpu_bench(['toy'], steps=2, warmup=1, device='cpu', output=sys.argv[1], log=lambda s: None)
    rows.append(bench_gpu_row('toy', batch=2, steps=1, warmup=0, device='cpu'))     # another micro-batch, same process
    print(json.dumps(dict(rows=[r.to_dict() | dict(line=str(r)) for r in rows], seen=seen)))
''')


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp('gpu') / 'gpu.json'
    env = os.environ | {'DS_ACCELERATOR': 'cpu', 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-c', ROWS, str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.splitlines()[-1]) | dict(out=out)


def test_rows_train_through_the_trainer_with_deepspeed_zero2_bf16(trained):
    *rows, other = trained['rows']
    assert [(r['packing'], r['checkpointing']) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for r in rows:
        assert r['tokens'] > 0 and r['step_s'] > 0 and r['flops'] > 0 and r['plan_bytes'] > 0 and not r['error']
        assert r['peak_bytes'] is None and r['mfu'] is None and r['plan_within_25'] is None   # a CPU: no memory
        assert r['line'].startswith('toy')
    # same weights, same samples: packing and checkpointing change how the step runs, not its loss (bf16 rounding)
    assert all(abs(r['loss'] - rows[0]['loss']) < 2e-2 for r in rows)
    assert not trained['out'].exists()                                 # results_gpu.json holds GPU runs only
    for s in trained['seen']:
        assert s['deepspeed'] and s['zero'] == 'DeepSpeedZeroOptimizer' and s['stage'] == 2
        assert s['weights'] == ['torch.bfloat16'] and s['masters'] == ['torch.float32']
        # fp32 masters and Adam's two moments: 12 of plan's 18 bytes per trained weight, held between steps
        assert s['master_bytes'] == 4 * s['trained'] and s['moment_bytes'] == 8 * s['trained']
    assert [(s['micro_batch'], s['steps']) for s in trained['seen']] == [(4, 3)] * 4 + [(2, 1)]
    assert other['batch'] == 2 and other['step_s'] > 0


def test_flops_and_mfu_are_the_hand_computation():
    row, _ = planned_row('toy', steps=2, warmup=1, gpu='h100')
    m = meta_model('toy:qwen2', 'toy:siglip')
    t, v, k = m.config.text_config, m.config.vision_config, m.num_image_tokens
    lm, counts = m.language_model, count_params(m, FINETUNE)
    tied = lm.get_output_embeddings().weight is lm.get_input_embeddings().weight
    n_llm = counts['llm']['total'] - (0 if tied else t.vocab_size * t.hidden_size)   # the weights that multiply
    patches = (v.image_size // v.patch_size) ** 2                                    # SigLIP: no CLS token
    per_image = (2 * counts['vision_tower']['total'] * patches + 4 * v.num_hidden_layers * v.hidden_size * patches ** 2
                 + 3 * 2 * counts['connector']['total'] * k)                      # frozen tower once, connector 3x
    samples = llava_samples(3 * 4, 64, k, v.image_size, t.vocab_size)[4:]          # after the warm-up batch of 4
    seqs = [len(s['input_ids']) - 1 + k for s in samples]
    flops = sum(3 * (2 * n_llm * s + 4 * t.num_hidden_layers * t.hidden_size * s ** 2) + per_image for s in seqs)
    assert row.tokens == sum(seqs) / 2
    assert row.flops == pytest.approx(flops / 2, rel=1e-12)
    row.step_s = 0.25
    assert row.mfu == pytest.approx(row.flops / (0.25 * 989e12), rel=1e-12) and PEAK_BF16['h100'] == 989e12
    assert row.tokens_per_s == pytest.approx(row.tokens / 0.25)


def test_plan_memory_is_zero2_on_one_gpu_plus_activations_by_hand():
    m = meta_model('toy:qwen2', 'toy:siglip')
    t, k, counts = m.config.text_config, m.num_image_tokens, count_params(m, FINETUNE)
    h, layers, vocab = t.hidden_size, t.num_hidden_layers, t.vocab_size
    group = [dict(input_ids=torch.zeros(n)) for n in (11, 31)]                      # merged: 10 + k and 30 + k
    states = 2 * counts['all']['total'] + 18 * counts['all']['trainable']          # DeepSpeed bf16: 2 + 18 bytes
    padded, packed = (30 + k, 2), (40 + 2 * k, 1)                                   # (positions, rows)
    full = lambda s, b: layers * 34 * s * b * h + 6 * s * b * vocab
    ckpt = lambda s, b: layers * 2 * s * b * h + 34 * s * b * h + 6 * s * b * vocab
    assert plan_memory(m, counts, [group], False, False) == states + full(*padded)
    assert plan_memory(m, counts, [group], True, False) == states + full(*packed)
    assert plan_memory(m, counts, [group], False, True) == states + ckpt(*padded)


def test_config_gpu_names_and_threshold():
    assert ZERO2 == json.loads((ROOT / 'configs/zero2.json').read_text())
    assert [gpu_name(n) for n in ('NVIDIA H100 80GB HBM3', 'NVIDIA A100-SXM4-80GB', 'NVIDIA H200',
                                  'NVIDIA GeForce RTX 4090', 'NVIDIA A10G', 'NVIDIA H100 PCIe')] == \
        ['h100', 'a100', 'h200', 'rtx4090', None, None]
    assert set(GPU_SETUPS) >= {'qwen2-0.5b', 'phi-2'}
    assert GpuRow('x', 'sdpa', False, False, 1, 10, peak_bytes=8).plan_within and \
        not GpuRow('x', 'sdpa', False, False, 1, 11, peak_bytes=8).plan_within


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cli_refuses_without_a_gpu():
    r = subprocess.run(['tinyllava-nb', 'bench', '--gpu', '--config', 'toy', '--steps', '1'], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and 'needs a CUDA GPU' in r.stderr and 'Traceback' not in r.stderr
    r = subprocess.run(['tinyllava-nb', 'bench', '--steps', '1'], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and '--steps only apply with --gpu' in r.stderr
