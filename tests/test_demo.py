"The main job's --fast variant: trains, evaluates, writes its outputs, and beats chance clearly."
import json, os, subprocess
from pathlib import Path

def test_demo_fast(tmp_path):
    out = tmp_path / 'demo'
    r = subprocess.run(['tinyllava-nb', 'demo', '--fast', '--output-dir', str(out)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, 'DS_ACCELERATOR': 'cpu'})
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'written to' in r.stdout.splitlines()[-1]
    m = json.loads((out / 'metrics.json').read_text())
    colour, count, shape = (m['question_types'][k] for k in ('colour', 'count', 'shape'))
    # measured on 2 cores, 2026-12-01: colour 68.5% (chance 17%), count 72% (33%), shape 50.5% (25%)
    assert colour['accuracy'] > colour['chance'] + 0.3, colour
    assert count['accuracy'] > count['chance'] + 0.2, count
    assert shape['accuracy'] > shape['chance'] + 0.1, shape
    assert m['by_shapes']['colour']['1'] > 0.9, m['by_shapes']                # one shape: its colour, every time (measured 100%)
    for f in ('loss.png', 'predictions.png', 'model/model.safetensors', 'model/tokenizer.json'):
        assert (out / f).exists(), f
    again = subprocess.run(['tinyllava-nb', 'demo', '--fast', '--output-dir', str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and '--overwrite' in again.stderr


def test_demo_fast_on_the_2025_stack(tmp_path):
    "The same job on 2025-26 parts: Qwen3 + SigLIP2 NaFlex + pixel shuffle (36 patches -> 9 tokens a picture)."
    out = tmp_path / 'demo'
    r = subprocess.run(['tinyllava-nb', 'demo', '--fast', '--llm', 'qwen3', '--vision', 'siglip2', '--connector',
                        'pixel_shuffle2x_mlp', '--output-dir', str(out)], capture_output=True, text=True, timeout=900,
                       env={**os.environ, 'DS_ACCELERATOR': 'cpu'})
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / 'metrics.json').read_text())
    assert (m['config']['llm'], m['config']['vision'], m['config']['connector']) == ('qwen3', 'siglip2', 'pixel_shuffle2x_mlp')
    colour, count, shape = (m['question_types'][k] for k in ('colour', 'count', 'shape'))
    # measured on 2 cores, 2026-12-02: colour 56.5% (chance 17%), count 44% (33%), shape 49.5% (25%)
    assert colour['accuracy'] > colour['chance'] + 0.25, colour
    assert shape['accuracy'] > shape['chance'] + 0.1, shape
    assert count['accuracy'] > count['chance'], count
    assert json.loads((out / 'model' / 'config.json').read_text())['conv_version'] == 'chatml'   # Qwen3's default
