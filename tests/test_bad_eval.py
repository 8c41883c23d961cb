"Scorers and the eval runner on bad input: lost, reordered, duplicated and unreadable answers, torn resumes, locks."
import json, os, random, subprocess, sys
from pathlib import Path
import pytest

from tinyllava_nb.eval.score import (pair_answers, pope_metrics, pope_yes_no, read_results, score_gqa, score_mme,
                                     score_pope, score_vqav2)

def jsonl(path, rows):
    Path(path).write_text(''.join(json.dumps(r) + '\n' for r in rows)); return path

# ---- POPE: answers meet labels by question id --------------------------------------------------------------------

@pytest.fixture
def pope72(tmp_path):
    "72 POPE questions over 2 categories (3 present, 3 absent objects per image), and perfect answers."
    labels = (['yes'] * 3 + ['no'] * 3) * 6
    (tmp_path / 'ann').mkdir()
    qs = []
    for cat in ('adversarial', 'random'):
        jsonl(tmp_path / 'ann' / f'coco_pope_{cat}.json', [{'label': l} for l in labels])
        qs += [dict(question_id=len(qs) + i, category=cat, text='Is there a cat?') for i in range(len(labels))]
    answers = [dict(question_id=q['question_id'], text=l.capitalize() + '.') for q, l in zip(qs, labels * 2)]
    return tmp_path, jsonl(tmp_path / 'q.jsonl', qs), answers

def test_pope_lost_and_reordered_answers(pope72):
    d, qfile, answers = pope72
    score = lambda rows: score_pope(d / 'ann', qfile, jsonl(d / 'a.jsonl', rows))
    full = score(answers)
    assert (full['mean_accuracy'], full['missing'], full['duplicated'], full['unknown']) == (1.0, 0, 0, 0)
    lost = score(answers[1:])
    assert lost['mean_accuracy'] == 1.0 and lost['missing'] == 1 and lost['categories']['adversarial']['missing'] == 1
    assert lost['categories']['adversarial']['samples'] == 35 and lost['categories']['random']['missing'] == 0
    shuffled = score(random.Random(1).sample(answers, len(answers)))
    assert shuffled['mean_accuracy'] == 1.0 and shuffled['missing'] == 0
    extra = score(answers + [dict(answers[0], text='No'), dict(question_id=999, text='yes')])
    assert (extra['duplicated'], extra['unknown']) == (1, 1)
    assert extra['categories']['adversarial']['accuracy'] == 35 / 36          # the last answer of an id wins

def test_pope_equals_positional_pairing_on_a_complete_file(pope72):
    "On a complete file in question order, pairing by id gives exactly LLaVA's positional numbers."
    d, qfile, answers = pope72
    rng = random.Random(0)
    noisy = [dict(a, text=rng.choice(['Yes', 'No.', 'There is not a cat', 'Nope', 'yes, a cat'])) for a in answers]
    got = score_pope(d / 'ann', qfile, jsonl(d / 'a.jsonl', noisy))['categories']
    labels = (['yes'] * 3 + ['no'] * 3) * 6
    for k, cat in enumerate(('adversarial', 'random')):
        official = pope_metrics([pope_yes_no(a['text']) for a in noisy[36 * k:36 * (k + 1)]], labels)
        assert {m: v for m, v in got[cat].items() if m not in ('labels', 'missing')} == official
    assert got['adversarial']['accuracy'] not in (0.0, 1.0)                   # a test that could fail

def test_pope_question_and_label_files_must_agree(pope72):
    d, qfile, answers = pope72
    short = jsonl(d / 'short.jsonl', [json.loads(l) for l in qfile.read_text().splitlines()][:-1])
    with pytest.raises(ValueError, match='coco_pope_random.json: 36 labels, but .* has 35'):
        score_pope(d / 'ann', short, jsonl(d / 'a.jsonl', answers))

# ---- MME, GQA: the same counts ------------------------------------------------------------------------------------

@pytest.fixture
def mme(tmp_path):
    "An MME ground truth of 4 colour images (2 questions each), answered perfectly."
    (tmp_path / 'MME' / 'color').mkdir(parents=True)
    rows = []
    for i in range(4):
        (tmp_path / 'MME' / 'color' / f'{i}.txt').write_text(
            f"Is it red{i}? Please answer yes or no.\tYes\nIs it blue{i}? Please answer yes or no.\tNo\n")
        rows += [dict(question_id=f'color/{i}.png', prompt=f'Is it red{i}?', text='Yes'),
                 dict(question_id=f'color/{i}.png', prompt=f'Is it blue{i}?', text='No')]
    return tmp_path, rows

def test_mme_missing_answer_costs_only_its_image(mme):
    d, rows = mme
    full = score_mme(jsonl(d / 'a.jsonl', rows), d / 'MME')['perception']['tasks']['color']
    assert (full['accuracy'], full['acc_plus'], full['score']) == (100.0, 100.0, 200.0)
    r = score_mme(jsonl(d / 'a.jsonl', rows[1:]), d / 'MME')
    color = r['perception']['tasks']['color']
    assert (color['accuracy'], color['acc_plus'], color['missing'], r['missing']) == (87.5, 75.0, 1, 1)
    extra = [dict(rows[0], text='No'), dict(rows[0], question_id='color/9.png')]
    r = score_mme(jsonl(d / 'a.jsonl', rows[::-1] + extra), d / 'MME')
    color = r['perception']['tasks']['color']
    assert (color['acc_plus'], r['duplicated'], r['unknown'], r['missing']) == (75.0, 1, 1, 0)   # 'No' came last: wins

def test_mme_answer_with_line_break_and_tab(mme):
    "calculation.py stops on such answers (they break its tab-separated lines); here they are read whole."
    d, rows = mme
    rows[0]['text'], rows[1]['text'] = 'Yes\nbecause it is red', 'No\tit is not'
    color = score_mme(jsonl(d / 'a.jsonl', rows), d / 'MME')['perception']['tasks']['color']
    assert color['score'] == 200.0

def test_gqa_duplicated_id_is_reported(tmp_path):
    qs = {'1': dict(isBalanced=True, answer='yes', types=dict(structural='verify')),
          '2': dict(isBalanced=True, answer='dog', types=dict(structural='query'))}
    (tmp_path / 'q.json').write_text(json.dumps(qs))
    rows = [dict(question_id='1', text='Yes'), dict(question_id='1', text='No'), dict(question_id='2', text='dog')]
    r = score_gqa(tmp_path / 'q.json', jsonl(tmp_path / 'a.jsonl', rows))
    assert (r['accuracy'], r['duplicated'], r['missing'], r['unknown']) == (50.0, 1, 0, 0)

def test_pair_answers_accounts_for_every_answer():
    rng = random.Random(0)
    questions = list(range(50))
    answers = [dict(question_id=rng.randrange(70)) for _ in range(80)]
    paired, c = pair_answers(answers, questions)
    assert len(answers) == len(questions) - c['missing'] + c['duplicated'] + c['unknown']
    assert all(p is None or p['question_id'] == q for p, q in zip(paired, questions))

# ---- unreadable lines and files ------------------------------------------------------------------------------------

def test_non_utf8_line_is_counted_not_fatal(tmp_path):
    qs = {'1': dict(isBalanced=True, answer='yes', types=dict(structural='verify')),
          '2': dict(isBalanced=True, answer='no', types=dict(structural='verify'))}
    (tmp_path / 'q.json').write_text(json.dumps(qs))
    (tmp_path / 'a.jsonl').write_bytes(b'{"question_id": "1", "text": "Yes"}\n{"question_id": "2", "text": "N\xf6"}\n')
    r = score_gqa(tmp_path / 'q.json', tmp_path / 'a.jsonl')
    assert (r['accuracy'], r['malformed_lines'], r['missing']) == (50.0, 1, 1)
    assert r['malformed_at'] == [f"{tmp_path / 'a.jsonl'}:2: not UTF-8"]

@pytest.fixture
def vqa(tmp_path):
    ann = lambda qid, a: dict(question_id=qid, question_type='what', answer_type='other', answers=[dict(answer=a)] * 10)
    (tmp_path / 'ann.json').write_text(json.dumps({'annotations': [ann(1, 'red'), ann(2, 'two')]}))
    (tmp_path / 'q.json').write_text(json.dumps({'questions': [{'question_id': 1}, {'question_id': 2}]}))
    return tmp_path

def test_vqav2_reads_the_official_results_format(vqa):
    (vqa / 'res.json').write_text(json.dumps([dict(question_id=1, answer='red'), dict(question_id=2, answer='three')]))
    r = score_vqav2(vqa / 'ann.json', vqa / 'q.json', vqa / 'res.json')
    assert (r['overall'], r['malformed_lines'], r['missing']) == (50.0, 0, 0)
    jsonl(vqa / 'res.jsonl', [{'question_id': 1, 'text': 'red'}, {'question_id': 2, 'text': 'three'}])
    assert score_vqav2(vqa / 'ann.json', vqa / 'q.json', vqa / 'res.jsonl')['overall'] == 50.0

def test_unreadable_answers_file_is_an_error(vqa):
    (vqa / 'bad.json').write_text('{"results": [{"question_id": 1, "answer": "red"}]}\n')
    with pytest.raises(ValueError, match=f"no answer could be read from {vqa / 'bad.json'}"):
        score_vqav2(vqa / 'ann.json', vqa / 'q.json', vqa / 'bad.json')
    (vqa / 'latin1.jsonl').write_bytes('{"question_id": 1, "text": "rouge café"}\n'.encode('latin-1'))
    with pytest.raises(ValueError, match='latin1.jsonl:1: not UTF-8'): read_results(vqa / 'latin1.jsonl')
    assert read_results(jsonl(vqa / 'empty.jsonl', [])) == ([], [])          # empty: every question missing, no error

def test_score_cli_reads_a_json_list(vqa):
    (vqa / 'res.json').write_text(json.dumps([dict(question_id=1, answer='red'), dict(question_id=2, answer='two')]))
    r = subprocess.run(['tinyllava-nb', 'score', 'vqav2', '--annotation-file', vqa / 'ann.json',
                        '--question-file', vqa / 'q.json', '--result-file', vqa / 'res.json'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)['overall'] == 100.0

# ---- the runner: resume, model id, lock ----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def toy(tmp_path_factory):
    from tinyllava_nb.model.tinyllava import toy_tinyllava
    from tinyllava_nb.world import make_world
    d = tmp_path_factory.mktemp('run')
    make_world(d, n_train=4, n_eval=4)
    qs = [dict(question_id=i, image=f'images/train_{i % 4}.png', text=f'Is it red? ({i})') for i in range(10)]
    return d, jsonl(d / 'q.jsonl', qs), toy_tinyllava('phi', 'siglip', 'mlp2x_gelu')

def run(toy, answers, **kw):
    from tinyllava_nb.eval.run import run_benchmark
    d, qfile, (model, tok, proc) = toy
    return run_benchmark('pope', model, tok, proc, qfile, d, answers, batch_size=4, max_new_tokens=2, **kw)

ids_in = lambda path: [json.loads(l)['question_id'] for l in Path(path).read_text().splitlines()]

def test_resume_after_a_torn_last_line(toy, tmp_path):
    a = tmp_path / 'a.jsonl'
    assert run(toy, a, model_id='m')['answered'] == 10
    text = a.read_text()
    a.write_text(text[:text.rindex('{"question_id": 9') + 30])               # killed while writing answer 9
    first = run(toy, a, model_id='m')
    assert (first['answered'], first['already_answered'], first['dropped_torn_line']) == (1, 9, True)
    assert ids_in(a) == list(range(10))
    second = run(toy, a, model_id='m')
    assert (second['answered'], second['dropped_torn_line']) == (0, False) and ids_in(a) == list(range(10))

def test_resume_keeps_question_order(toy, tmp_path):
    a = tmp_path / 'a.jsonl'
    run(toy, a)
    lines = a.read_text().splitlines(keepends=True)
    a.write_text(''.join(lines[:3] + lines[4:]))
    assert run(toy, a)['answered'] == 1 and ids_in(a) == list(range(10))

def test_resume_refuses_another_models_file(toy, tmp_path):
    a = tmp_path / 'a.jsonl'
    run(toy, a, model_id='model-a')
    before = a.read_bytes()
    with pytest.raises(ValueError, match=f'{a} holds answers of model "model-a", not of "model-b"'):
        run(toy, a, model_id='model-b')
    assert a.read_bytes() == before
    assert run(toy, a, model_id='model-b', overwrite=True)['answered'] == 10
    assert {json.loads(l)['model_id'] for l in a.read_text().splitlines()} == {'model-b'}

def test_a_second_evaluation_on_the_same_file_is_refused(toy, tmp_path):
    a = tmp_path / 'a.jsonl'
    hold = (f"import filelock, time; lock = filelock.FileLock({str(a) + '.lock'!r}); lock.acquire(); "
            "print('held', flush=True); time.sleep(60)")
    other = subprocess.Popen([sys.executable, '-c', hold], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == 'held'
        with pytest.raises(ValueError, match=f'another evaluation is writing {a}'): run(toy, a)
        assert not a.exists()
    finally: other.kill(); other.wait()
    assert run(toy, a)['answered'] == 10                                       # once released, it runs

def test_cli_eval_refuses_another_models_answers(toy, tmp_path):
    from tinyllava_nb.model.tinyllava import save_pretrained_all
    d, qfile, (model, tok, proc) = toy
    for name in ('model-a', 'model-b'): save_pretrained_all(model, tok, proc, tmp_path / name)
    args = ['--question-file', qfile, '--image-folder', d, '--answers-file', tmp_path / 'a.jsonl',
            '--max-new-tokens', '2']
    cmd = lambda m: subprocess.run(['tinyllava-nb', 'eval', 'pope', '--model-path', tmp_path / m, *args],
                                   capture_output=True, text=True, timeout=300,
                                   env={**os.environ, 'OMP_NUM_THREADS': '1', 'DS_ACCELERATOR': 'cpu'})
    assert cmd('model-a').returncode == 0
    r = cmd('model-b')
    assert r.returncode != 0
    assert f'{tmp_path / "a.jsonl"} holds answers of model "model-a", not of "model-b"' in r.stderr
