"Label guarantees of every template x toy tokenizer: 36,800 random conversations in all (the notebook runs 150 a pair)."
import pytest
from tinyllava_nb.data.template import fuzz_templates, templates
from tinyllava_nb.toy import toy_tokenizer, toy_tokenizers

def n_tokenizers(name):
    "Toy tokenizers a template is fuzzed with: all, and Llama's with legacy=True; `chat_template`: those with one."
    if name == 'chat_template': return sum(bool(toy_tokenizer(f).chat_template) for f in toy_tokenizers)
    return len(toy_tokenizers) + 1

@pytest.mark.parametrize('name', templates.names())
def test_fuzz_template(name):
    assert fuzz_templates(320, seed=sum(map(ord, name)), names=[name]) == 320 * n_tokenizers(name)

def test_fuzz_covers_the_new_formats():
    assert {'chatml', 'llama3', 'phi3', 'chat_template'} <= set(templates.names())
    assert n_tokenizers('chat_template') >= 3 and sum(n_tokenizers(n) for n in templates.names()) * 320 == 36_800


def offsets_reference(text, spans, tokenizer):
    "The earlier implementation: every token's offsets, trained if its start lies inside a span (fast tokenizers only)."
    import numpy as np, torch
    from tinyllava_nb.data.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX, _chunks
    bounds = np.array([b for s in spans for b in s], dtype=np.int64)
    cuts = set()
    while True:
        chunks = _chunks(text, cuts)
        enc = tokenizer([c for p, c in chunks if p is not None], add_special_tokens=False, return_offsets_mapping=True)
        encoded = iter(zip(enc['input_ids'], enc['offset_mapping']))
        prefix = tokenizer("").input_ids
        ids, start, end = list(prefix), [-1] * len(prefix), [-1] * len(prefix)
        for p, _ in chunks:
            if p is None: ids.append(IMAGE_TOKEN_INDEX); start.append(-1); end.append(-1); continue
            pid, off = next(encoded)
            ids += pid; start += [p + s for s, _ in off]; end += [p + e for _, e in off]
        start, end = np.array(start), np.array(end)
        inside = np.searchsorted(bounds, start, side='right')
        crossed = np.searchsorted(bounds, end, side='left') - inside
        straddled = {int(bounds[k]) for k in inside[(crossed > 0) & (start >= 0)]}
        if not straddled - cuts: break
        cuts |= straddled
    ids = torch.tensor(ids)
    return ids, torch.where(torch.from_numpy((inside % 2 == 1) & (start >= 0)), ids, IGNORE_INDEX)


@pytest.mark.parametrize('family', toy_tokenizers.names() + ['llama-legacy'])
def test_labels_equal_offsets_reference(family):
    "The boundary lookup (char_to_token) labels exactly the tokens the per-token offsets reference labels."
    import random
    from tinyllava_nb.data.template import TemplateFactory, random_conversation, split_turns, tokenize_spans
    from tinyllava_nb.toy import toy_tokenizer
    tok = toy_tokenizer('llama', legacy=True) if family == 'llama-legacy' else toy_tokenizer(family)
    rng = random.Random(1)
    for name in templates.names():
        tpl = TemplateFactory(name)()
        if name == 'chat_template' and not tok.chat_template: continue
        for _ in range(100):
            text, spans = tpl.render(*split_turns(random_conversation(rng), 'train'), tok)
            ids, labels = tokenize_spans(text, spans, tok)
            ref_ids, ref_labels = offsets_reference(text, spans, tok)
            assert ids.tolist() == ref_ids.tolist() and labels.tolist() == ref_labels.tolist(), (name, text, spans)


def test_chat_template_refuses_an_answer_it_would_not_train():
    "A Jinja template that writes nothing after an answer: an empty answer would train nothing, so it is refused."
    from tinyllava_nb.data.template import ChatTemplate, SampleError
    tok = toy_tokenizer('qwen3')
    tok.chat_template = "{% for m in messages %}{{ m.role + ': ' + m.content }}{% endfor %}"
    with pytest.raises(SampleError, match='writes nothing after it'):
        ChatTemplate().encode([{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': ''}], tok)
    enc = ChatTemplate().encode([{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Yo'}], tok)
    assert tok.decode(enc['labels'][enc['labels'] != -100]) == 'Yo'
