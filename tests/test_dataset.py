"A data file with many kinds of broken samples mixed in: every bad sample is named and counted, every good one kept."
import json, random
import pytest
from PIL import Image
from tinyllava_nb.data.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
from tinyllava_nb.data.image import ImagePreprocess
from tinyllava_nb.data.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX, SampleError
from tinyllava_nb.toy import toy_image_processor, toy_tokenizer

GOOD = [{'from': 'human', 'value': '<image>\nWhat colour?'}, {'from': 'gpt', 'value': 'Red.'}]
BREAKERS = {   # kind -> how to break a good image sample
    'unbalanced turns': lambda s: {**s, 'conversations': s['conversations'][:1]},
    'bad role': lambda s: {**s, 'conversations': [s['conversations'][0], {'from': 'assistant', 'value': 'x'}]},
    'bad value': lambda s: {**s, 'conversations': [s['conversations'][0], {'from': 'gpt', 'value': 3}]},
    'empty conversation': lambda s: {**s, 'conversations': []},
    'image count mismatch': lambda s: {k: v for k, v in s.items() if k != 'image'},
    'missing image': lambda s: {**s, 'image': 'missing.png'},
    'unreadable image': lambda s: {**s, 'image': 'broken.png'},
    'image in answer': lambda s: {**s, 'conversations': [s['conversations'][0], {'from': 'gpt', 'value': 'see <image>'}]},
    'no conversations': lambda s: {k: v for k, v in s.items() if k != 'conversations'},
}

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp('data')
    Image.new('RGB', (20, 30), 'red').save(d / 'ok.png')
    (d / 'broken.png').write_bytes(b'\x89PNG but not really')
    rng, samples, expected = random.Random(0), [], {}
    for i in range(300):
        s = {'id': f's{i}', 'image': 'ok.png', 'conversations': GOOD}
        if i % 7 == 3: s = {'id': f's{i}', 'conversations': [{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Hello.'}]}
        elif rng.random() < 0.3:
            kind = rng.choice(sorted(BREAKERS)); s = BREAKERS[kind](s); expected[f's{i}'] = kind
        samples.append(s)
    (d / 'train.jsonl').write_text('\n'.join(json.dumps(s) for s in samples))
    return d, expected

def make(d, **kw):
    tok = toy_tokenizer('qwen2')
    return LazySupervisedDataset(d / 'train.jsonl', tok, 'qwen2_base', d, ImagePreprocess(toy_image_processor('clip')), **kw)

def test_every_bad_sample_named_and_counted(data):
    d, expected = data
    ds = make(d, skip_bad=True, full_check=True)
    assert {n: e.split(':')[0] for n, e in ds.summary['bad']} == expected
    assert ds.summary['kept'] == 300 - len(expected) == len(ds)
    assert sum(ds.summary['reasons'].values()) == len(expected)
    batch = DataCollatorForSupervisedDataset(ds.tokenizer)([ds[i] for i in range(len(ds))])
    assert ((batch['labels'] != IGNORE_INDEX).sum(1) > 0).all()          # no sample fully masked
    assert (batch['input_ids'] == IMAGE_TOKEN_INDEX).sum() == batch['images'].shape[0]

def test_bad_samples_raise_by_default(data):
    d, expected = data
    cheap = {k: v for k, v in expected.items() if v != 'unreadable image'}   # found without decoding images
    with pytest.raises(SampleError) as e: make(d)
    assert f"{len(cheap)} of 300 samples" in str(e.value)
    first = next(iter(cheap))
    assert f"sample {first!r}: {cheap[first]}" in str(e.value)
