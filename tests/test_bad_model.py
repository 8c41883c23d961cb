"Bad model directories, remote code and bad generation settings: clear errors, no code run unasked."
import json
from pathlib import Path

import pytest
import torch

from tinyllava_nb.cli import main
from tinyllava_nb.infer import generation_kwargs
from tinyllava_nb.model.tinyllava import load_pretrained, save_pretrained_all, toy_tinyllava

@pytest.fixture(scope='module')
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp('model')
    save_pretrained_all(*toy_tinyllava('llama', 'clip'), d)
    return d

def shadow_llm(d: Path) -> Path:
    "A directory whose config names Python code that leaves a trace when it runs."
    d.mkdir()
    (d / 'config.json').write_text(json.dumps({'model_type': 'shadow_llm', 'auto_map': {'AutoConfig': 'configuration_shadow.ShadowConfig'}}))
    (d / 'configuration_shadow.py').write_text(f"import pathlib; pathlib.Path({str(d / 'RAN')!r}).touch()\n"
                                               "from transformers import PretrainedConfig\n"
                                               "class ShadowConfig(PretrainedConfig): model_type = 'shadow_llm'\n")
    return d

def test_remote_code_runs_only_when_asked(saved, tmp_path):
    evil = shadow_llm(tmp_path / 'shadow')
    cfg = json.loads((saved / 'config.json').read_text())
    d = tmp_path / 'model'; d.mkdir()
    for f in saved.iterdir(): (d / f.name).write_bytes(f.read_bytes())
    (d / 'config.json').write_text(json.dumps({**cfg, 'llm_model_name_or_path': str(evil), 'text_config': None}))
    with pytest.raises(ValueError, match='trust_remote_code'): load_pretrained(d)
    assert main(['chat', '--model-path', str(d), '--prompt', 'hi']) == 2
    assert not (evil / 'RAN').exists()
    with pytest.raises(Exception): load_pretrained(d, trust_remote_code=True)    # asked: the code runs (then is no family)
    assert (evil / 'RAN').exists()

@pytest.mark.parametrize('kw, msg', [(dict(temperature=-1), 'temperature must be >= 0'), (dict(top_p=1.5), 'top_p'),
                                     (dict(num_beams=0), 'num_beams'), (dict(max_new_tokens=0), 'max_new_tokens')])
def test_generation_settings_out_of_range(kw, msg):
    with pytest.raises(ValueError, match=msg): generation_kwargs(**kw)

def test_chat_cli_beams_and_bad_values(saved, capsys):
    assert main(['chat', '--model-path', str(saved), '--prompt', 'Hi.', '--num_beams', '2', '--max_new_tokens', '4']) == 0
    assert capsys.readouterr().out.strip()                                   # beams: the answer is printed at the end
    assert main(['chat', '--model-path', str(saved), '--prompt', 'Hi.', '--temperature', '-1']) == 2
    assert 'temperature must be >= 0' in capsys.readouterr().err
    assert main(['chat', '--model-path', str(saved), '--prompt', 'Hi.', '--max_new_tokens', '100000']) == 2
    assert "exceeds the LLM's context" in capsys.readouterr().err

def test_flags_are_not_abbreviated(saved, capsys):
    with pytest.raises(SystemExit): main(['chat', '--model-path', str(saved), '--prompt', 'Hi.', '--max_new_tok', '4'])
    assert 'unrecognized arguments: --max_new_tok' in capsys.readouterr().err

def test_bad_directories_name_the_cause(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match='is not a directory'): load_pretrained(tmp_path / 'nothing')
    assert main(['chat', '--model-path', str(tmp_path), '--prompt', 'hi']) == 2     # no config.json: an error, no traceback

def test_training_runs_no_remote_code_unasked(tmp_path):
    from tinyllava_nb.train.run import build_model, parse_args
    evil = shadow_llm(tmp_path / 'shadow')
    m, d, t = parse_args(['--model_name_or_path', str(evil), '--output_dir', str(tmp_path / 'out'), '--use_cpu', 'true'])
    assert m.trust_remote_code is False
    with pytest.raises(ValueError, match='trust_remote_code'): build_model(m, t)
    assert not (evil / 'RAN').exists()
