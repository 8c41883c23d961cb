"Inference and evaluation through the CLI: chat, eval (batched, resumable), score, convert."
import json, os, subprocess
from pathlib import Path
import pytest

def cli(*args, check=True):
    r = subprocess.run(['tinyllava-nb', *map(str, args)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, 'OMP_NUM_THREADS': '2', 'DS_ACCELERATOR': 'cpu'})
    if check: assert r.returncode == 0, r.stderr[-3000:]
    return r

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp('eval')
    cli('world', '--output-dir', d / 'data', '--n-train', '16', '--n-eval', '4')
    cli('train', '--data_path', d / 'data/finetune.json', '--output_dir', d / 'model', '--max_steps', '20', '--learning_rate', '3e-3',
        '--tune_type_llm', 'full', '--use_cpu', 'true', '--report_to', 'none', '--disable_tqdm', 'true', '--per_device_train_batch_size', '8')
    return d

def test_chat_prompt(trained):
    r = cli('chat', '--model-path', trained / 'model', '--image-file', trained / 'data/images/train_0.png', '--prompt', 'What colour?',
            '--max-new-tokens', '5')
    assert r.stdout.strip()

def test_chat_conversation(trained):
    r = subprocess.run(['tinyllava-nb', 'chat', '--model-path', str(trained / 'model'), '--image-file', str(trained / 'data/images/train_0.png'),
                        '--max-new-tokens', '3'], input='What colour?\nAnd the shape?\n\n', capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('ASSISTANT:') == 2

def test_eval_then_score_pope(trained):
    d = trained
    samples = json.loads((d / 'data/pretrain.json').read_text())[:8]
    qs, labels = [], []
    for i, s in enumerate(samples):
        caption = s['conversations'][1]['value'].lower()             # 'A red circle and a blue square.'
        for j, c in enumerate(('red', 'green')):
            qs.append(dict(question_id=2 * i + j, image=s['image'], text=f'Is there a {c} shape?', category='adversarial'))
            labels.append('yes' if f' {c} ' in caption else 'no')
    (d / 'pope').mkdir(exist_ok=True)
    (d / 'pope/coco_pope_adversarial.json').write_text(''.join(json.dumps({'label': l}) + '\n' for l in labels))
    (d / 'q.jsonl').write_text(''.join(json.dumps(q) + '\n' for q in qs))
    run = ['eval', 'pope', '--model-path', d / 'model', '--question-file', d / 'q.jsonl', '--image-folder', d / 'data',
           '--answers-file', d / 'a.jsonl', '--batch-size', '5']
    first = json.loads(cli(*run).stdout.strip().splitlines()[-1])
    assert first['answered'] == 16
    again = json.loads(cli(*run).stdout.strip().splitlines()[-1])
    assert again['answered'] == 0 and again['already_answered'] == 16
    out = json.loads(cli('score', 'pope', '--annotation-dir', d / 'pope', '--question-file', d / 'q.jsonl', '--result-file', d / 'a.jsonl').stdout)
    m = out['categories']['adversarial']
    assert m['samples'] == 16 and m['TP'] + m['FP'] + m['TN'] + m['FN'] == 16
    assert (out['missing'], out['duplicated'], out['unknown'], out['malformed_lines']) == (0, 0, 0, 0)

def test_missing_image_names_the_file(trained, tmp_path):
    (tmp_path / 'q.jsonl').write_text(json.dumps(dict(question_id=1, image='lost.png', text='?')) + '\n')
    r = cli('eval', 'gqa', '--model-path', trained / 'model', '--question-file', tmp_path / 'q.jsonl', '--image-folder', tmp_path,
            '--answers-file', tmp_path / 'a.jsonl', check=False)
    assert r.returncode != 0 and 'lost.png' in r.stderr

def test_score_and_convert_cli(tmp_path):
    (tmp_path / 'a.jsonl').write_text('{"question_id": 1, "text": "Two"}\nnot json\n{"question_id": 5, "text": "x"}\n')
    (tmp_path / 'split.jsonl').write_text('{"question_id": 1}\n{"question_id": 2}\n')
    out = json.loads(cli('convert', 'vqav2', '--question-file', tmp_path / 'split.jsonl', '--result-file', tmp_path / 'a.jsonl',
                         '--dst', tmp_path / 'up/upload.json').stdout)
    assert (out['error_line'], out['missing'], out['total_split'], out['unknown']) == (1, 1, 2, 1)
    assert json.loads((tmp_path / 'up/upload.json').read_text()) == [{'question_id': 1, 'answer': '2'}, {'question_id': 2, 'answer': ''}]
    out = json.loads(cli('convert', 'mmvet', '--result-file', tmp_path / 'a.jsonl', '--dst', tmp_path / 'mmvet.json').stdout)
    assert json.loads((tmp_path / 'mmvet.json').read_text()) == {'v1_1': 'Two', 'v1_5': 'x'}
    (tmp_path / 'gqa.json').write_text(json.dumps({'1': {'isBalanced': True, 'answer': 'two', 'types': {'structural': 'query'}}}))
    (tmp_path / 'g.jsonl').write_text('{"question_id": "1", "text": "Two."}\n')
    assert json.loads(cli('score', 'gqa', '--questions', tmp_path / 'gqa.json', '--result-file', tmp_path / 'g.jsonl').stdout)['accuracy'] == 100.0
    r = cli('score', 'nope', check=False)
    assert r.returncode == 2
