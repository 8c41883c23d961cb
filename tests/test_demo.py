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
    colour, count = m['question_types']['colour'], m['question_types']['count']
    assert colour['accuracy'] > colour['chance'] + 0.3, colour          # measured: 68.5% against 17% chance (100% with one shape)
    assert count['accuracy'] > count['chance'] + 0.1, count             # measured: 54% against 33% chance
    for f in ('loss.png', 'predictions.png', 'model/model.safetensors', 'model/tokenizer.json'):
        assert (out / f).exists(), f
    again = subprocess.run(['tinyllava-nb', 'demo', '--fast', '--output-dir', str(out)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and '--overwrite' in again.stderr
