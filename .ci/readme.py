"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which cannot be installed offline).

Markdown cells are copied; the `# Title` / `> summary` header is kept; code cells become ```python blocks
(directive lines dropped, `#| hide` cells skipped) followed by their text output; links to nbs/ notebooks get the
`nbs/` prefix they need from the repository root."""
import re
from pathlib import Path
from execnb.nbio import read_nb

def cell_md(cell) -> str:
    src = cell.source
    if cell.cell_type == 'markdown': return src
    lines = src.splitlines()
    if any(l.strip() == '#| hide' for l in lines): return ''
    code = '\n'.join(l for l in lines if not l.startswith('#|')).strip()
    outs = []
    for o in cell.get('outputs', []):
        text = o.get('text') or o.get('data', {}).get('text/plain')
        if text: outs.append(''.join(text).rstrip())
    return f"```python\n{code}\n```" + ''.join(f"\n\n```\n{t}\n```" for t in outs)

def readme(nb_path='nbs/index.ipynb', out='README.md') -> str:
    nb = read_nb(nb_path)
    text = '\n\n'.join(md for md in map(cell_md, nb.cells) if md.strip()) + '\n'
    text = re.sub(r'\]\((\d\d_[\w.]+\.ipynb)\)', r'](nbs/\1)', text)   # the site links nbs/ notebooks from nbs/, the README from the root
    Path(out).write_text(text, encoding='utf-8')
    return text

if __name__ == '__main__': readme()
