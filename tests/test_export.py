"Export to transformers' LLaVA: same logits and greedy tokens on every toy family, refusals, the CLI, the model card."
import contextlib, io, json, os, subprocess, sys
from pathlib import Path

import pytest, torch

from tinyllava_nb import export
from tinyllava_nb.cli import main
from tinyllava_nb.export import (check_exportable, compare_export, compare_generation, export_hf, llava_messages,
                                 model_card, push, read_training_args, sample_image, to_llava)
from tinyllava_nb.infer import chat, conv_version_of, encode_question, image_preprocess_of
from tinyllava_nb.model.tinyllava import save_pretrained_all, toy_tinyllava

FAMILIES = ['phi', 'llama', 'qwen2', 'stablelm', 'gemma']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'DS_ACCELERATOR': 'cpu', 'HF_HUB_OFFLINE': '1'}


def exported(tmp_path, *parts, **kw):
    model, tok, proc = toy_tinyllava(*parts, seed=1, **kw)
    return model.eval(), tok, proc, to_llava(model.eval(), tok, proc, tmp_path / 'llava')


@pytest.mark.parametrize('connector', ['linear', 'mlp2x_gelu'])
@pytest.mark.parametrize('vision', ['clip', 'siglip'])
@pytest.mark.parametrize('llm', FAMILIES)
def test_same_logits_and_greedy_tokens(tmp_path, llm, vision, connector):
    model, tok, proc, out = exported(tmp_path, llm, vision, connector)
    d = compare_export(model, tok, proc, out)
    assert d['ids'] and d['pixels'] == 0 and d['image_features'] <= 1e-5 and d['logits'] <= 1e-5, d
    ours, theirs = compare_generation(model, tok, proc, out, max_new_tokens=6)
    assert ours == theirs and len(ours) >= 1


@pytest.mark.parametrize('llm', ['llama', 'gemma'])
def test_chat_answer_equals_the_processor_and_generate(tmp_path, llm):
    "`chat` (what `tinyllava-nb chat` runs) and the export's processor + generate give the same answer text."
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model, tok, proc, out = exported(tmp_path, llm, 'clip', 'mlp2x_gelu')
    image = sample_image()
    ours = chat(model, tok, proc, image, 'What colour is the circle?', max_new_tokens=6)
    llava, processor = LlavaForConditionalGeneration.from_pretrained(out), AutoProcessor.from_pretrained(out)
    messages = llava_messages([{'from': 'human', 'value': '<image>\nWhat colour is the circle?'}])
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors='pt')
    new = llava.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs['input_ids'].shape[1]:]
    assert ours and processor.decode(new, skip_special_tokens=True).strip() == ours


@pytest.mark.parametrize('llm', ['llama', 'phi'])
def test_left_padded_batch_through_the_processor(tmp_path, llm):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model, tok, proc, out = exported(tmp_path, llm, 'siglip', 'linear')
    llava, processor = LlavaForConditionalGeneration.from_pretrained(out), AutoProcessor.from_pretrained(out)
    questions, images = ['What colour is the circle?', 'Is there a small red square on the left of it?'], [
        sample_image(), sample_image((40, 56))]
    texts = [processor.apply_chat_template(llava_messages([{'from': 'human', 'value': '<image>\n' + q}]),
                                           add_generation_prompt=True) for q in questions]
    inputs = processor(images=images, text=texts, padding=True, return_tensors='pt')
    assert (inputs['attention_mask'][:, 0] == 0).any()                               # left padded
    theirs = llava.generate(**inputs, max_new_tokens=5, do_sample=False)[:, inputs['input_ids'].shape[1]:]
    pre = image_preprocess_of(model, proc)
    for q, im, row in zip(questions, images, theirs):
        ids = encode_question(q, tok, conv_version_of(model))['input_ids']
        ours = model.decode(ids[None], pre(im)[None], max_new_tokens=5)[0].tolist()
        assert row[:len(ours)].tolist() == ours


@pytest.mark.parametrize('vision', ['clip', 'siglip'])
def test_pad_aspect_ratio_on_a_wide_picture(tmp_path, vision):
    model, tok, proc, out = exported(tmp_path, 'qwen2', vision, 'mlp2x_gelu', image_aspect_ratio='pad')
    d = compare_export(model, tok, proc, out, image=sample_image((80, 36)))
    assert d['pixels'] == 0 and d['ids'] and d['logits'] <= 1e-5, d


def test_tied_embeddings_and_cls_patch(tmp_path):
    from tinyllava_nb.model.llm import llm_family
    from tinyllava_nb.model.tinyllava import TinyLlavaConfig, TinyLlavaForConditionalGeneration
    from tinyllava_nb.toy import toy_image_processor, toy_llm_config, toy_tokenizer, toy_vision_config
    tok = llm_family('gemma').post_load(toy_tokenizer('gemma'))
    cfg = TinyLlavaConfig(text_config=toy_llm_config('gemma', tok, tie_word_embeddings=True),
                          vision_config=toy_vision_config('clip'), connector_type='linear',
                          pad_token_id=tok.pad_token_id,
                          vision_feature_select_strategy='cls_patch', vision_feature_layer=-1)
    torch.manual_seed(0)
    model, proc = TinyLlavaForConditionalGeneration(cfg).eval(), toy_image_processor('clip')
    out = to_llava(model, tok, proc, tmp_path / 'llava')
    config = json.loads((out / 'config.json').read_text())
    assert config['vision_feature_select_strategy'] == 'full' and config['image_seq_length'] == 17
    d = compare_export(model, tok, proc, out)
    assert d['ids'] and d['logits'] <= 1e-5, d
    ours, theirs = compare_generation(model, tok, proc, out)
    assert ours == theirs and len(ours) >= 1


@pytest.mark.parametrize('parts, kw, part', [
    (('phi', 'mof', 'mof_mlp'), {}, "vision tower 'mof'"),
    (('phi', 'siglip', 'resampler'), {}, "connector 'resampler'"),
    (('phi', 'siglip', 'qformer'), {}, "connector 'qformer'"),
    (('phi', 'siglip', 'mlp3x_gelu'), {}, "3 linear layers"),
    (('phi', 'siglip', 'linear'), dict(image_aspect_ratio='anyres', image_grid_pinpoints=[(64, 32)]), "'anyres'"),
])
def test_refused_parts_write_nothing(tmp_path, parts, kw, part):
    model, tok, proc = toy_tinyllava(*parts, **kw)
    with pytest.raises(ValueError, match=part): check_exportable(model)
    save_pretrained_all(model, tok, proc, tmp_path / 'model')
    with pytest.raises(ValueError, match=part): export_hf(tmp_path / 'model', tmp_path / 'llava')
    assert not (tmp_path / 'llava').exists() and not list(tmp_path.glob('.*export'))


def test_phi_lm_head_bias_is_refused():
    model = toy_tinyllava('phi', 'siglip', 'linear')[0]
    check_exportable(model)                                      # a zero bias: nothing lost
    with torch.no_grad(): model.language_model.lm_head.bias[3] = 0.5
    with pytest.raises(ValueError, match=r"lm_head has a bias \(phi\)"): check_exportable(model)


def test_a_failed_check_keeps_nothing_and_overwrite_is_asked(tmp_path, monkeypatch):
    save_pretrained_all(*toy_tinyllava('gemma', 'clip', 'mlp2x_gelu'), tmp_path / 'model')
    good = export.projector_weights
    def unscaled(model):                                         # forget Gemma's image scale
        w, act = good(model)
        s = model.config.hidden_size ** 0.5
        return {**w, 'linear_2.weight': w['linear_2.weight'] / s, 'linear_2.bias': w['linear_2.bias'] / s}, act
    monkeypatch.setattr(export, 'projector_weights', unscaled)
    with pytest.raises(ValueError, match='the vision tower or projector'):
        export_hf(tmp_path / 'model', tmp_path / 'llava')
    assert not (tmp_path / 'llava').exists() and not list(tmp_path.glob('.*export'))
    monkeypatch.setattr(export, 'projector_weights', good)
    (tmp_path / 'llava').mkdir(); (tmp_path / 'llava' / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='is not empty'): export_hf(tmp_path / 'model', tmp_path / 'llava')
    assert (tmp_path / 'llava' / 'notes.txt').read_text() == 'mine'
    export_hf(tmp_path / 'model', tmp_path / 'llava', overwrite=True)
    assert not (tmp_path / 'llava' / 'notes.txt').exists() and (tmp_path / 'llava' / 'model.safetensors').exists()
    with pytest.raises(ValueError, match='would replace the model'):
        export_hf(tmp_path / 'model', tmp_path, overwrite=True)


LOAD_WITHOUT_US = """
import sys, json
sys.modules['tinyllava_nb'] = None                              # importing it now fails
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained(sys.argv[1])
processor = AutoProcessor.from_pretrained(sys.argv[1])
messages = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'What colour is the circle?'}]}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open(sys.argv[2]), text=text, return_tensors='pt')
new = model.generate(**inputs, max_new_tokens=6, do_sample=False)[0, inputs['input_ids'].shape[1]:]
print(json.dumps(new.tolist()))
"""

def test_cli_export_loads_without_tinyllava_nb_then_push_dry_run(tmp_path):
    model, tok, proc = toy_tinyllava('llama', 'siglip', 'mlp2x_gelu', seed=1)
    save_pretrained_all(model, tok, proc, tmp_path / 'model')
    (tmp_path / 'metrics.json').write_text(json.dumps({'vqa_overall': 0.42}))
    run = lambda *a: subprocess.run(['tinyllava-nb', *a], capture_output=True, text=True, timeout=120, env=ENV)
    r = run('export-hf', '--model-path', str(tmp_path / 'model'), '--output-dir', str(tmp_path / 'llava'))
    assert r.returncode == 0, r.stderr
    err = io.StringIO()
    with contextlib.redirect_stderr(err):          # in this process from here on: each start costs seconds
        code = main(['export-hf', '--model-path', str(tmp_path / 'model'), '--output-dir', str(tmp_path / 'llava')])
    assert code == 2
    assert 'is not empty' in err.getvalue()
    sample_image().save(tmp_path / 'picture.png')
    r = subprocess.run([sys.executable, '-c', LOAD_WITHOUT_US, str(tmp_path / 'llava'), str(tmp_path / 'picture.png')],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 0, r.stderr
    from PIL import Image
    model.eval()
    ids = encode_question('What colour is the circle?', tok, conv_version_of(model))['input_ids']
    pixels = image_preprocess_of(model, proc)(Image.open(tmp_path / 'picture.png'))
    ours = model.decode(ids[None], pixels[None], max_new_tokens=6)[0].tolist()
    assert json.loads(r.stdout.strip().splitlines()[-1]) == ours
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(['push', '--model-path', str(tmp_path / 'llava'), '--repo-id', 'you/toy', '--dry-run', '--data',
                     'Toy shapes.']) == 0
    listed = out.getvalue()
    assert 'would upload' in listed and 'model.safetensors' in listed and 'chat_template.jinja' in listed
    card = (tmp_path / 'llava' / 'README.md').read_text()
    assert 'library_name: transformers' in card and '| vqa_overall | 0.42 |' in card and 'Toy shapes.' in card
    assert '| connector | mlp2x_gelu |' in card and '| chat template | llama |' in card
    assert 'exported from `model`' in card


def test_training_args_are_read_without_running_code(tmp_path):
    from tinyllava_nb.train.trainer import TrainingArguments
    args = TrainingArguments(output_dir=str(tmp_path / 'run'), learning_rate=2e-4, max_steps=7, use_cpu=True,
                             report_to='none', lr_scheduler_type='cosine')
    torch.save(args, tmp_path / 'training_args.bin')
    got = read_training_args(tmp_path / 'training_args.bin')
    assert got['learning_rate'] == 2e-4 and got['max_steps'] == 7 and got['lr_scheduler_type'] == 'cosine'

    class Evil:
        def __reduce__(self): return (os.system, (f'touch {tmp_path / "ran"}',))
    torch.save(Evil(), tmp_path / 'evil.bin')
    read_training_args(tmp_path / 'evil.bin')
    assert not (tmp_path / 'ran').exists()


def test_push_uploads_the_folder_with_its_card(tmp_path, monkeypatch):
    import huggingface_hub
    calls = []
    class FakeApi:
        def __init__(self, token=None): pass
        def create_repo(self, repo_id, **kw): calls.append(('create_repo', repo_id, kw))
        def upload_folder(self, **kw): calls.append(('upload_folder', kw['repo_id'], kw))
    monkeypatch.setattr(huggingface_hub, 'HfApi', FakeApi)
    save_pretrained_all(*toy_tinyllava('qwen2', 'siglip', 'linear'), tmp_path / 'model')
    (tmp_path / 'model' / 'busy.lock').write_text('')
    files = push(tmp_path / 'model', 'you/toy', private=True)
    assert [c[0] for c in calls] == ['create_repo', 'upload_folder'] and calls[0][2]['private']
    assert 'README.md' in files and 'busy.lock' not in files and '*.lock' in calls[1][2]['ignore_patterns']
    assert model_card(tmp_path / 'model').startswith('---\nlibrary_name: tinyllava_nb')


FACTORY = sorted(p for p in (Path(__file__).parent / 'data' / 'tinyllava_factory').iterdir() if p.is_dir())

@pytest.mark.parametrize('d', FACTORY, ids=[p.name for p in FACTORY])
def test_tinyllava_factory_checkpoints_export_with_its_logits(tmp_path, d):
    "A checkpoint saved by TinyLLaVA Factory's own code (transformers 4.40), exported: its logits and greedy tokens."
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    out = export_hf(d, tmp_path / 'llava')
    ref = torch.load(d / 'reference.pt')
    llava, processor = LlavaForConditionalGeneration.from_pretrained(out).eval(), AutoProcessor.from_pretrained(out)
    image_id, n = llava.config.image_token_id, llava.config.image_seq_length
    prompt = json.loads((d / 'prompt_ids.json').read_text())                      # one -200 per image
    ids = torch.tensor([[t for i in prompt for t in ([image_id] * n if i == -200 else [i])]])
    pixels = processor.image_processor(Image.open(d / 'image.png'), return_tensors='pt')['pixel_values']
    with torch.no_grad():
        logits = llava(input_ids=ids, pixel_values=pixels).logits[0, :, :ref['logits'].shape[-1]]
        new = llava.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    torch.testing.assert_close(logits[ref['rows']], ref['logits'], atol=1e-4, rtol=0)
    assert new.tolist() == ref['greedy'].tolist()


def test_a_bfloat16_model_exports_in_bfloat16(tmp_path):
    from transformers import LlavaForConditionalGeneration
    model, tok, proc = toy_tinyllava('gemma', 'siglip', 'mlp2x_gelu', seed=1)
    save_pretrained_all(model.to(torch.bfloat16), tok, proc, tmp_path / 'model')
    out = export_hf(tmp_path / 'model', tmp_path / 'llava')                     # checked, relative to 16-bit rounding
    assert LlavaForConditionalGeneration.from_pretrained(out).dtype == torch.bfloat16


def test_lmms_eval_adapter_gives_our_runners_answers_and_accuracy(tmp_path):
    "lmms-eval (where installed) with `--model tinyllava_nb` on the shapes world: our answers, our accuracy."
    pytest.importorskip('lmms_eval')
    from tinyllava_nb.eval.run import run_benchmark
    from tinyllava_nb.eval.score import read_jsonl, score_gqa
    from tinyllava_nb.export import lmms_eval_main, shapes_lmms_task
    from tinyllava_nb.model.tinyllava import load_pretrained
    from tinyllava_nb.world import make_world
    world = make_world(tmp_path / 'world', n_train=1, n_eval=6)
    save_pretrained_all(*toy_tinyllava('qwen2', 'siglip', 'mlp2x_gelu', seed=1, image_size=48), tmp_path / 'model')
    model, tok, proc = load_pretrained(tmp_path / 'model')
    run_benchmark('gqa', model, tok, proc, world['vqa_questions'], world['root'], tmp_path / 'ours.jsonl',
                  max_new_tokens=16)
    ours = {a['question_id']: a['text'] for a in read_jsonl(tmp_path / 'ours.jsonl')[0]}
    gt = json.loads(world['vqa_gt'].read_text())                 # every other answer made right: accuracy is not 0
    for k, qid in enumerate(sorted(gt)):
        if k % 2: gt[qid]['answer'] = ours[qid].rstrip('.').lower()
    world['vqa_gt'].write_text(json.dumps(gt))
    accuracy = score_gqa(world['vqa_gt'], tmp_path / 'ours.jsonl')['accuracy']
    shapes_lmms_task(world, tmp_path / 'tasks')
    lmms_eval_main(['--model', 'tinyllava_nb', '--model_args', f'pretrained={tmp_path / "model"}',
                    '--tasks', 'shapes_vqa', '--include_path', str(tmp_path / 'tasks'), '--batch_size', '4',
                    '--output_path', str(tmp_path / 'lmms'), '--log_samples'])
    results = json.loads(next((tmp_path / 'lmms').rglob('*_results.json')).read_text())['results']['shapes_vqa']
    samples = [json.loads(l) for f in (tmp_path / 'lmms').rglob('*_samples_shapes_vqa.jsonl') for l in f.open()]
    qids = [json.loads(l)['question_id'] for l in world['vqa_questions'].open()]    # doc_id: the line of the task file
    first = lambda r: r[0] if isinstance(r, list) else r
    theirs = {qids[s['doc_id']]: first(s['filtered_resps']) for s in samples}
    assert theirs == ours and 0 < accuracy < 100
    assert abs(results['accuracy,none'] * 100 - accuracy) < 1e-9


def test_lmms_eval_loglikelihood_is_the_models_loss(tmp_path):
    "The adapter's log-probability of an answer is minus the model's summed loss on it (no lmms-eval needed)."
    from types import SimpleNamespace
    from tinyllava_nb.data.template import IGNORE_INDEX
    from tinyllava_nb.export import TinyLlavaLmms
    save_pretrained_all(*toy_tinyllava('llama', 'clip', 'linear', seed=1), tmp_path / 'model')
    lm = TinyLlavaLmms(pretrained=str(tmp_path / 'model'))
    lm.task_dict = {'t': {'test': [{'image': sample_image()}]}}
    picture = lambda doc: [doc['image']]
    (logp, greedy), = lm.loglikelihood([SimpleNamespace(args=('What colour?', ' Red', picture, 0, 't', 'test'))])
    ids, pixels = lm._prompt('What colour?', picture, 0, 't', 'test')
    cont = torch.tensor(lm.tokenizer(' Red', add_special_tokens=False).input_ids)
    with torch.no_grad():
        out = lm.model(input_ids=torch.cat([ids, cont])[None], images=pixels[None],
                       labels=torch.cat([torch.full_like(ids, IGNORE_INDEX), cont])[None])
    assert abs(logp + out.loss.item() * len(cont)) < 1e-4
    n = len(cont)                                                 # greedy: every answer token is the argmax
    assert greedy == bool((out.logits[0, -n - 1:-1].argmax(-1) == cont).all())


def test_lmms_eval_batches_answer_as_alone_and_stop_at_until(tmp_path):
    "generate_until: batches of equal generation arguments give each question's own answer, cut at `until`."
    from types import SimpleNamespace
    from tinyllava_nb.export import TinyLlavaLmms
    save_pretrained_all(*toy_tinyllava('qwen2', 'siglip', 'linear', seed=1), tmp_path / 'model')
    lm = TinyLlavaLmms(pretrained=str(tmp_path / 'model'), batch_size=3)
    lm.task_dict = {'t': {'test': [{'image': sample_image()}, {'image': sample_image((40, 56))}, {'image': None}]}}
    picture = lambda doc: [doc['image']]
    short, long = {'max_new_tokens': 3, 'until': []}, {'max_new_tokens': 6, 'until': []}
    requests = [SimpleNamespace(args=(q, g, picture, i % 3, 't', 'test')) for i, (q, g) in enumerate(
        [('What colour?', short), ('Is it red?', short), ('Hello?', long), ('Which shape?', long)])]
    answers = lm.generate_until(requests)
    assert answers == [lm.generate_until([r])[0] for r in requests]
    assert all(a for a in answers)
    cut = {**long, 'until': [answers[3][1:3]]}                       # a stop string inside the answer
    stopped, = lm.generate_until([SimpleNamespace(args=('Which shape?', cut, picture, 0, 't', 'test'))])
    assert stopped == answers[3].split(answers[3][1:3])[0] and len(stopped) < len(answers[3])
    two = lambda doc: [doc['image'], doc['image']]
    with pytest.raises(ValueError, match=r't document 0: 2 image\(s\) given, but the conversation has 1 <image>'):
        lm.generate_until([SimpleNamespace(args=('Two?', short, two, 0, 't', 'test'))])


def test_lmms_eval_command_without_lmms_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, 'lmms_eval', None)             # as where it is not installed
    monkeypatch.setitem(sys.modules, 'lmms_eval.models', None)
    err = io.StringIO()
    with contextlib.redirect_stderr(err): code = main(['lmms-eval', '--tasks', 'gqa'])
    assert code == 2 and 'lmms-eval is not installed: pip install tinyllava_nb[lmms]' in err.getvalue()


def test_pipeline_image_text_to_text_answers_as_chat(tmp_path):
    from transformers import pipeline
    model, tok, proc, out = exported(tmp_path, 'llama', 'clip', 'mlp2x_gelu')
    pipe = pipeline('image-text-to-text', model=str(out))
    messages = [{'role': 'user', 'content': [{'type': 'image', 'image': sample_image()},
                                             {'type': 'text', 'text': 'What colour is the circle?'}]}]
    answer = pipe(text=messages, max_new_tokens=6, return_full_text=False)[0]['generated_text']
    assert answer.strip() == chat(model, tok, proc, sample_image(), 'What colour is the circle?', max_new_tokens=6)
