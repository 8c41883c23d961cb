"""Committed outputs stay readable: no carriage-return progress noise, at most 200 KB of outputs per notebook.

Usage: python .ci/check_outputs.py [notebooks...]   (default: nbs/*.ipynb and tutorials/*.ipynb)"""
import json, sys
from pathlib import Path

LIMIT = 200_000

def problems(path) -> list:
    "What is wrong with one notebook's saved outputs."
    nb, out = json.loads(Path(path).read_text()), []
    size = sum(len(json.dumps(c.get('outputs', []))) for c in nb['cells'])
    if size > LIMIT: out.append(f"{size / 1000:.0f} KB of outputs (limit {LIMIT // 1000} KB): save pictures at a smaller dpi")
    for i, c in enumerate(nb['cells']):
        for o in c.get('outputs', []):
            text = o.get('text', '')
            if '\r' in (''.join(text) if isinstance(text, list) else text):
                out.append(f"cell {i}: a carriage return in its output (a progress bar): run it with .ci/run_notebooks.py")
    return out

if __name__ == '__main__':
    paths = sys.argv[1:] or sorted(map(str, [*Path('nbs').glob('*.ipynb'), *Path('tutorials').glob('*.ipynb')]))
    bad = {p: ps for p in paths if (ps := problems(p))}
    for p, ps in bad.items(): print(p + ':\n  ' + '\n  '.join(ps))
    if bad: sys.exit(1)
    print(f"outputs of {len(paths)} notebooks: no progress-bar noise, each under {LIMIT // 1000} KB")
