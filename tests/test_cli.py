"The installed console script, end to end in a subprocess."
import json, subprocess, sys

def run(*args):
    return subprocess.run(['tinyllava-nb', *args], capture_output=True, text=True, timeout=120)

def test_labels_default():
    r = run('labels', '--template', 'llama', '--tokenizer', 'toy:llama-legacy')
    assert r.returncode == 0, r.stderr
    assert '[[</s>]]' in r.stdout and 'tokens trained)' in r.stdout

def test_labels_from_data_file(tmp_path):
    conv = [{'from': 'human', 'value': 'Colour?'}, {'from': 'gpt', 'value': 'Teal.'}]
    (tmp_path / 'd.json').write_text(json.dumps([{'id': 'x', 'conversations': conv}]))
    r = run('labels', '--data', str(tmp_path / 'd.json'), '--template', 'qwen2_instruct', '--tokenizer', 'toy:qwen2')
    assert r.returncode == 0, r.stderr
    assert '[[<|im_end|>]]' in r.stdout

def test_unknown_template_is_a_clear_error():
    r = run('labels', '--template', 'vicuna_v1')
    assert r.returncode == 2 and "Traceback" not in r.stderr and "registered: chat_template, chatml, gemma, llama, llama3, phi, phi3, pretrain, qwen2_base, qwen2_instruct" in r.stderr
