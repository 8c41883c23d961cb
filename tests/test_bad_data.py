"Bad pictures and bad samples: decoded right, named (sample and file) when they cannot be, counted when skipped."
import io, json, random, struct, warnings, zlib
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader

from tinyllava_nb.data.dataset import LazySupervisedDataset, load_samples
from tinyllava_nb.data.image import ImagePreprocess, expand2square, to_rgb
from tinyllava_nb.data.template import SampleError
from tinyllava_nb.toy import toy_image_processor, toy_tokenizer

ASK = [{'from': 'human', 'value': '<image>\nWhat colour?'}, {'from': 'gpt', 'value': 'Red.'}]
TEXT = [{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Hello.'}]


def huge_header_png(path, w=20000, h=10000):
    "A one-pixel PNG whose header declares `w` x `h` (checksum fixed), past PIL's decompression-bomb limit."
    Image.new('L', (1, 1)).save(path)
    raw = bytearray(path.read_bytes())
    raw[16:24] = struct.pack('>II', w, h)
    raw[29:33] = struct.pack('>I', zlib.crc32(raw[12:29]))
    path.write_bytes(raw)


@pytest.fixture
def folder(tmp_path):
    Image.new('RGB', (40, 30), 'red').save(tmp_path / 'ok.png')
    Image.new('RGB', (40, 30), 'red').save(tmp_path / 'cut.png')
    (tmp_path / 'cut.png').write_bytes((tmp_path / 'cut.png').read_bytes()[:60])        # truncated PNG
    (tmp_path / 'notes.jpg').write_text('a text file named like a picture')
    huge_header_png(tmp_path / 'huge.png')
    return tmp_path


def write(folder, samples, name='train.json'):
    (folder / name).write_text(json.dumps(samples))
    return folder / name


def make(path, **kw):
    kw = {'image_preprocess': ImagePreprocess(toy_image_processor('clip', 32)), **kw}
    return LazySupervisedDataset(path, toy_tokenizer('qwen2'), 'qwen2_base', path.parent, **kw)


# ---- pictures decode correctly ------------------------------------------------------------------------------

def grey_levels(pixels, proc):
    "Undo the processor's normalisation: 0..255 levels, [3, H, W]."
    return (pixels * torch.tensor(proc.image_std)[:, None, None] + torch.tensor(proc.image_mean)[:, None, None]) * 255


@pytest.mark.parametrize('mode', ['square', 'pad', 'anyres'])
def test_16bit_float_and_transparent_files(tmp_path, mode):
    proc = toy_image_processor('siglip', 32)
    pre = ImagePreprocess(proc, mode, [(32, 32), (64, 64)])
    Image.fromarray(np.full((40, 40), 32896, np.uint16)).save(tmp_path / 'grey16.png')        # mid grey, 16-bit
    Image.fromarray(np.full((40, 40), 0.5, np.float32)).save(tmp_path / 'float.tif')          # mid grey, float
    Image.new('RGBA', (40, 40), (0, 160, 0, 0)).save(tmp_path / 'clear.png')                  # hides green
    Image.new('LA', (40, 40), (0, 0)).save(tmp_path / 'clear_la.png')
    pal = Image.new('P', (40, 40), 1); pal.putpalette([0, 0, 0, 0, 160, 0])                   # index 1: green
    pal.save(tmp_path / 'clear.gif', transparency=1)
    for name, level in [('grey16.png', 128), ('float.tif', 128), ('clear.png', 255), ('clear_la.png', 255),
                        ('clear.gif', 255)]:
        got = grey_levels(pre.open(tmp_path / name).reshape(-1, 3, 32, 32)[0], proc)
        assert (got - level).abs().max() < 1.5, (name, mode, got.mean((1, 2)))


def test_to_rgb_never_clips_16bit():
    a = np.random.default_rng(0).integers(0, 65536, (50, 50), dtype=np.uint16)
    rgb = np.asarray(to_rgb(Image.fromarray(a)))
    assert (rgb == 255).mean() < 0.01                        # convert('RGB') makes 99.6 % of these white
    np.testing.assert_array_equal(rgb[..., 0], np.round(a / 257).astype(np.uint8))


def photo(w, h):
    g = Image.linear_gradient('L').resize((w, h))
    im = Image.merge('RGB', [g, g.transpose(Image.Transpose.FLIP_LEFT_RIGHT), g.transpose(Image.Transpose.ROTATE_180)])
    d = ImageDraw.Draw(im); d.ellipse((w // 10, h // 10, w // 2, h // 2), fill='red')
    d.rectangle((w * 6 // 10, h // 5, w * 9 // 10, h * 9 // 10), fill='blue')
    return im


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_big_image_decoded_small_and_close(tmp_path, fmt):
    "`open` decodes a JPEG at 1/8 scale; the result stays within a few levels of the processor's on the whole image."
    path = tmp_path / f'big.{fmt.lower()}'
    photo(3000, 2000).save(path, fmt)
    seen, given = [], []                                     # sizes decoded; sizes handed to the processor
    class Spy(ImagePreprocess):
        def __call__(self, image): seen.append(image.size); return super().__call__(image)
        def pixels(self, images): given.append(images.size); return super().pixels(images)
    for proc in [toy_image_processor('clip', 32), toy_image_processor('siglip', 32)]:
        for mode in ['square', 'pad']:
            pre, whole = Spy(proc, mode), to_rgb(Image.open(path))
            if mode == 'pad': whole = expand2square(whole, tuple(int(x * 255) for x in proc.image_mean))
            d = (grey_levels(pre.open(path), proc) - grey_levels(pre.pixels(whole)[0], proc)).abs()
            assert d.max() <= 6 and d.mean() < 0.5, (fmt, mode, d.max(), d.mean())
    assert set(seen) == {(375, 250) if fmt == 'JPEG' else (3000, 2000)}
    assert max(max(g) for g in given[::2]) <= 3 * 32 * 1.5    # `open` hands ~3 x the processor's size to it


# ---- bad images name the sample and the file ------------------------------------------------------------------

@pytest.mark.parametrize('image,kind,reason', [
    ('cut.png', 'unreadable image', 'image file is truncated'),
    ('notes.jpg', 'unreadable image', 'cannot identify image file'),
    ('huge.png', 'image too large', 'Image size (200000000 pixels) exceeds limit'),
])
def test_bad_image_named_when_not_skipping(folder, image, kind, reason):
    ds = make(write(folder, [{'id': 'good', 'image': 'ok.png', 'conversations': ASK},
                             {'id': 'bad-one', 'image': image, 'conversations': ASK}]))
    assert ds[0]['id'] == 'good'
    with pytest.raises(SampleError) as e: ds[1]
    assert e.value.kind == kind
    assert f"{kind}: sample 'bad-one' (#1 in train.json): {folder / image}: {reason}" in str(e.value)
    assert ds.summary['skipped'] == 0


def test_bad_images_skipped_counted_replaced(folder):
    samples = [{'id': 'a', 'image': 'ok.png', 'conversations': ASK},
               {'id': 'cut', 'image': 'cut.png', 'conversations': ASK},
               {'id': 'notes', 'image': 'notes.jpg', 'conversations': ASK},
               {'id': 'b', 'conversations': TEXT},
               {'id': 'huge', 'image': 'huge.png', 'conversations': ASK}]
    ds = make(write(folder, samples), skip_bad=True)
    with pytest.warns(UserWarning) as caught:
        ids = [ds[i]['id'] for i in range(len(ds))]
    assert ids == ['a', 'b', 'b', 'b', 'a']                  # the next good sample, wrapping round at the end
    assert len(caught) == 3 and "sample 'huge' (#4 in train.json)" in str(caught[2].message)
    s = ds.summary
    assert (s['samples'], s['kept'], s['skipped']) == (5, 2, 3)
    assert s['reasons'] == Counter({'unreadable image': 2, 'image too large': 1})
    assert [n for n, _ in s['bad']] == ['cut', 'notes', 'huge']
    assert all(str(folder) in m for _, m in s['bad'])       # found in this process: the full message
    with warnings.catch_warnings():
        warnings.simplefilter('error')                       # a marked sample is not decoded (nor warned) again
        assert [ds[i]['id'] for i in range(len(ds))] == ids


def test_over_long_sample_skipped_at_load(folder):
    long = [{'from': 'human', 'value': 'word ' * 300}, {'from': 'gpt', 'value': 'Yes.'}]
    path = write(folder, [{'id': 'long', 'conversations': long}, {'id': 'short', 'conversations': TEXT}])
    with pytest.raises(SampleError, match=r"too long: sample 'long' \(#0 in train.json\)"):
        make(path, model_max_length=64)[0]
    ds = make(path, model_max_length=64, skip_bad=True)
    with pytest.warns(UserWarning, match='too long'): assert ds[0]['id'] == 'short'
    assert ds.summary['reasons'] == Counter({'too long': 1})


def test_all_bad_raises(folder):
    ds = make(write(folder, [{'id': 'x', 'image': 'cut.png', 'conversations': ASK}]), skip_bad=True)
    with pytest.warns(UserWarning), pytest.raises(SampleError, match='none of the 1 samples in train.json loads'): ds[0]
    with pytest.raises(IndexError): ds[1]


@pytest.mark.parametrize('context', ['fork', 'spawn'])
def test_counts_from_dataloader_workers_reach_the_main_process(folder, context):
    samples = [{'id': f's{i}', 'image': ['ok.png', 'cut.png', 'notes.jpg'][i % 3], 'conversations': ASK}
               for i in range(12)]
    ds = make(write(folder, samples), skip_bad=True)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        loader = DataLoader(ds, batch_size=3, num_workers=2, collate_fn=list, multiprocessing_context=context)
        for epoch in range(2 if context == 'fork' else 1):   # a second epoch's workers skip the marked samples
            ids = [x['id'] for b in loader for x in b]
            assert len(ids) == 12 and set(ids) == {'s0', 's3', 's6', 's9'}
    s = ds.summary
    assert (s['kept'], s['skipped']) == (4, 8)
    assert s['reasons'] == Counter({'unreadable image': 8})
    assert all('found by a DataLoader worker' in m for _, m in s['bad'])


# ---- malformed sample fields: named at build, never a traceback --------------------------------------------

MALFORMED = {   # id -> (sample without id, kind)
    'image-int': ({'image': 5, 'conversations': ASK}, 'bad image field'),
    'image-none-item': ({'image': [None], 'conversations': ASK}, 'bad image field'),
    'image-empty': ({'image': '', 'conversations': ASK}, 'bad image field'),
    'image-dict': ({'image': {'path': 'ok.png'}, 'conversations': ASK}, 'bad image field'),
    'image-bool': ({'image': True, 'conversations': ASK}, 'bad image field'),
    'surrogate-question': ({'conversations': [{'from': 'human', 'value': 'Hi \ud800'}, TEXT[1]]}, 'bad text'),
    'surrogate-answer': ({'conversations': [TEXT[0], {'from': 'gpt', 'value': '\udfff!'}]}, 'bad text'),
    'surrogate-path': ({'image': 'ok\ud83d.png', 'conversations': ASK}, 'bad text'),
    'long-name': ({'image': 'x' * 300 + '.png', 'conversations': ASK}, 'unreadable image'),
    'folder-as-image': ({'image': '.', 'conversations': ASK}, 'missing image'),
    'turns-dict': ({'conversations': {'from': 'human'}}, 'no conversations'),
    'turn-string': ({'conversations': ['hi', 'there']}, 'bad role'),
    'value-list': ({'conversations': [TEXT[0], {'from': 'gpt', 'value': ['a']}]}, 'bad value'),
    'value-missing': ({'conversations': [TEXT[0], {'from': 'gpt'}]}, 'bad value'),
    'role-int': ({'conversations': [{'from': 1, 'value': 'x'}, TEXT[1]]}, 'bad role'),
}


def test_malformed_fields_named(folder):
    samples = [{'id': 'good', 'image': 'ok.png', 'conversations': ASK}]
    samples += [{'id': k, **s} for k, (s, _) in MALFORMED.items()]
    samples += [None, 'a string', 7, {'id': ['a', 'list'], 'conversations': TEXT}]   # not objects; an odd id is fine
    path = write(folder, samples)
    with pytest.raises(SampleError) as e: make(path)
    message = str(e.value)
    message.encode('utf-8')                                  # printable: surrogates only as escapes
    assert f"{len(MALFORMED) + 3} of {len(samples)} samples in train.json are bad" in message
    for k, (_, kind) in MALFORMED.items(): assert f"sample {k!r}: {kind}" in message, k
    for i in (len(MALFORMED) + 1, len(MALFORMED) + 2, len(MALFORMED) + 3):
        assert f"sample '#{i}': no conversations" in message
    ds = make(path, skip_bad=True)
    assert [s['_name'] for s in ds.samples] == ['good', "['a', 'list']"]
    assert ds.lengths and ds[1]['id'] == "['a', 'list']"     # what is kept tokenizes (no surrogate reaches it)
    assert ds.summary['reasons']['bad text'] == 3


def test_bad_files_named(tmp_path):
    (tmp_path / 'latin1.json').write_bytes('[{"id": "café"}]'.encode('latin-1'))
    with pytest.raises(ValueError, match=r'latin1.json: not UTF-8 text \(byte 12'):
        load_samples(tmp_path / 'latin1.json')
    (tmp_path / 'comma.json').write_text('[{"id": "a"},]')
    with pytest.raises(ValueError, match=r'comma.json: not valid JSON'): load_samples(tmp_path / 'comma.json')
    (tmp_path / 'odd.jsonl').write_text('{"id": "a\u2028b\u0085c"}\n\n{"id": "d"}\n', encoding='utf-8')
    assert load_samples(tmp_path / 'odd.jsonl') == [{'id': 'a\u2028b\u0085c'}, {'id': 'd'}]
    (tmp_path / 'bom.jsonl').write_bytes(b'\xef\xbb\xbf{"id": "a"}\n')
    assert load_samples(tmp_path / 'bom.jsonl') == [{'id': 'a'}]


def test_corrupted_images_always_named(tmp_path):
    "Random damage to files of every common format: each sample fails with a SampleError naming it, or loads."
    base = Image.new('RGB', (48, 36), 'white'); ImageDraw.Draw(base).ellipse((5, 5, 30, 30), fill='red')
    rng, samples = random.Random(0), []
    for k in range(60):
        fmt = ['PNG', 'JPEG', 'GIF', 'BMP', 'TIFF', 'WEBP'][k % 6]
        b = io.BytesIO(); base.save(b, fmt); data = bytearray(b.getvalue())
        if k % 2: data = data[:rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 6)): data[rng.randrange(len(data))] = rng.randrange(256)
        (tmp_path / f'{k}.img').write_bytes(data)
        samples.append({'id': f'x{k}', 'image': f'{k}.img', 'conversations': ASK})
    ds = make(write(tmp_path, samples))
    for i in range(len(ds)):
        try: assert ds[i]['images'].shape == (1, 3, 32, 32)
        except SampleError as e:
            assert e.kind in ('unreadable image', 'image too large')
            assert f"sample 'x{i}' (#{i} in train.json): {tmp_path / f'{i}.img'}: " in str(e)

def test_training_skips_a_picture_found_bad_while_loading(tmp_path):
    "A run with a truncated picture: skipping on, it trains, saves and reports it; off, it fails naming the sample."
    import os, subprocess
    from pathlib import Path
    from tinyllava_nb.world import make_world
    data = make_world(tmp_path / 'data', n_train=8, n_eval=4)
    bad = data['root'] / 'images' / 'train_3.png'
    bad.write_bytes(bad.read_bytes()[:40])                               # a copy cut short
    root = Path(__file__).resolve().parents[1]
    run = lambda out, *extra: subprocess.run(
        ['tinyllava-nb', 'train', str(root / 'configs/toy_pretrain.yaml'), '--data_path', str(data['pretrain']),
         '--image_folder', str(data['root']), '--output_dir', str(tmp_path / out), '--max_steps', '4',
         '--use_cpu', 'true', '--report_to', 'none', '--disable_tqdm', 'true', '--per_device_train_batch_size', '8', *extra],
        capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    r = run('skip', '--skip_bad_samples', 'true')
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'skipped 1 of 8 samples' in r.stdout and (tmp_path / 'skip' / 'model.safetensors').exists()
    r = run('strict')
    assert r.returncode != 0 and 'unreadable image' in r.stderr and 'train_3.png' in r.stderr, r.stderr[-2000:]


def test_template_that_does_not_fit_the_tokenizer_is_refused(tmp_path):
    "A Llama 3 template on Phi-2's tokenizer would teach the model to spell '<|eot_id|>' out: refused before training."
    from tinyllava_nb.toy import toy_tokenizer
    f = tmp_path / 'd.json'
    f.write_text(json.dumps([{'conversations': [{'from': 'human', 'value': 'Hi'}, {'from': 'gpt', 'value': 'Yo'}]}]))
    with pytest.raises(ValueError, match=r"ends each answer with '<\|eot_id\|>', which the tokenizer \(CodeGenTokenizer"):
        LazySupervisedDataset(f, toy_tokenizer('phi'), 'llama3')
    assert len(LazySupervisedDataset(f, toy_tokenizer('llama3'), 'llama3')) == 1
