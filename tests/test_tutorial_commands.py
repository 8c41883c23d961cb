"Every command the tutorials show (shell blocks, sh(...) calls, main([...])) parses with the package's real parsers."
import ast, json, re, shlex
from pathlib import Path

import pytest

from tinyllava_nb.cli import parse_command
from tinyllava_nb.train.run import parse_args

ROOT = Path(__file__).resolve().parents[1]
STARTS = ('tinyllava-nb ', 'torchrun ', 'deepspeed ')


def commands(nb_path: Path) -> list:
    "(kind, argv) for each command in a notebook: 'shell' lines and sh('...') strings, 'train' for main([...]) lists."
    found = []
    for cell in json.loads(nb_path.read_text())['cells']:
        src = ''.join(cell['source'])
        if cell['cell_type'] == 'markdown':
            for block in re.findall(r'```bash\n(.*?)```', src, re.S):
                for line in block.replace('\\\n', ' ').splitlines():
                    line = re.sub(r'^([A-Z_]+=\S+\s+)+', '', line.lstrip('# ').strip())    # PYTHONPATH=... tinyllava-nb ...
                    if line.startswith(STARTS): found.append(('shell', shlex.split(line)))
        else:
            for call in ast.walk(ast.parse('\n'.join(l for l in src.splitlines() if not l.startswith(('%', '!'))))):
                if not (isinstance(call, ast.Call) and call.args): continue
                name, arg = getattr(call.func, 'id', None), call.args[0]
                if name == 'sh' and isinstance(arg, ast.Constant) and arg.value.startswith(STARTS):   # 'a' 'b': one
                    found.append(('shell', shlex.split(arg.value)))
                if name == 'main': found.append(('train', ast.literal_eval(arg)))
    return found


def parse_train(argv: list):
    "The training parser; `--use_cpu true` only so that bf16 configs construct on this GPU-less machine."
    return parse_args(argv + ['--use_cpu', 'true'])


def launcher(argv: list) -> list:
    "The launcher's own flags parsed by the launcher; the arguments the run's processes get (DeepSpeed's first)."
    if argv[0] == 'torchrun':
        from torch.distributed.run import parse_args as torchrun_args
        torchrun_args(argv[1:])                                    # -m MODULE ARGS: the run's arguments follow
        return argv[argv.index('tinyllava_nb.train.run') + 1:]
    from deepspeed.launcher.runner import parse_args as deepspeed_args
    a = deepspeed_args(argv[1:])                                   # an unknown flag (e.g. -m) exits
    assert a.module and a.user_script == 'tinyllava_nb.train.run', argv
    return ['--local_rank=0', *a.user_args]                        # as deepspeed/launcher/launch.py calls the module


def check(kind: str, argv: list):
    if kind == 'train': return parse_train(argv)
    if argv[0] == 'tinyllava-nb':
        name, args = parse_command(argv[1:])
        return parse_train(args) if name == 'train' else args
    return parse_train(launcher(argv))


NOTEBOOKS = sorted((ROOT / 'tutorials').glob('*.ipynb'))


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_tutorial_commands_parse(nb, monkeypatch):
    monkeypatch.chdir(ROOT)                     # configs/ paths are relative to the repository
    monkeypatch.syspath_prepend(str(ROOT / 'tutorials' / 'extensions'))     # what the tutorials' PYTHONPATH= gives `--import`
    for kind, argv in commands(nb):
        try: check(kind, argv)
        except (SystemExit, ValueError) as e: pytest.fail(f"{nb.name}: {' '.join(argv)} does not parse: {e!r}")


def test_the_gpu_tutorial_has_commands():
    kinds = [argv[0] for _, argv in commands(ROOT / 'tutorials' / '06_train_on_a_gpu.ipynb')]
    assert kinds.count('torchrun') >= 3 and kinds.count('tinyllava-nb') >= 3


def test_a_wrong_flag_is_caught(monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match='no_such_flag'):
        check('shell', shlex.split('torchrun --nproc_per_node 1 -m tinyllava_nb.train.run configs/pretrain_phi2_siglip.yaml --no_such_flag 1'))
    with pytest.raises(SystemExit):
        check('shell', shlex.split('tinyllava-nb score pope --annotation-dir a --result-file b'))     # --question-file missing
    with pytest.raises(SystemExit):                                # DeepSpeed's launcher takes --module, not -m
        check('shell', shlex.split('deepspeed --num_gpus 8 -m tinyllava_nb.train.run configs/pretrain_phi2_siglip.yaml'))
