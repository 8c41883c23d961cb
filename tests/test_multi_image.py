"Several images per sample, split images (a slot per tile), anyres with unequal tiles, NaFlex grids: data to model."
import json, os
import pytest, torch
import transformers
os.environ.setdefault('DS_ACCELERATOR', 'cpu')
transformers.utils.logging.disable_progress_bar()
from PIL import Image, ImageDraw
from tinyllava_nb.data.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset, concat_images, truncate
from tinyllava_nb.data.image import ImagePreprocess, image_size, split_image_text
from tinyllava_nb.data.template import IGNORE_INDEX, IMAGE_TOKEN_INDEX as I, SampleError
from tinyllava_nb.infer import chat, encode_question, question_inputs
from tinyllava_nb.model.tinyllava import toy_tinyllava
from tinyllava_nb.toy import toy_image_processor

PINS = [(32, 32), (64, 32), (64, 64)]
QUESTION = 'Image 1: <image> Image 2: <image> Which has more shapes?'

def shapes(x): return None if x is None else tuple(x.shape) if torch.is_tensor(x) else [tuple(t.shape) for t in x]

def quadrants(w: int, h: int) -> Image.Image:
    "An image whose four quadrants are red, green, blue and white (row by row)."
    im = Image.new('RGB', (w, h)); d = ImageDraw.Draw(im)
    for k, c in enumerate(['red', 'lime', 'blue', 'white']):
        x, y = k % 2 * w // 2, k // 2 * h // 2
        d.rectangle((x, y, x + w // 2 - 1, y + h // 2 - 1), fill=c)
    return im

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "A tiny data file: a two-image sample, a one-image sample (a wide JPEG), a text-only one; images drawn with PIL."
    root = tmp_path_factory.mktemp('multi')
    quadrants(40, 40).save(root / 'square.png')
    quadrants(64, 32).save(root / 'wide.png')
    quadrants(100, 40).save(root / 'scene.jpg', quality=95)
    turn = lambda q, a: [{'from': 'human', 'value': q}, {'from': 'gpt', 'value': a}]
    samples = [{'id': 'pair', 'image': ['square.png', 'wide.png'], 'conversations': turn(QUESTION, 'Image 2.')},
               {'id': 'one', 'image': 'scene.jpg', 'conversations': turn('<image>\nWhat is it?', 'Four colours.')
                                                                    + turn('Which is first?', 'Red.')},
               {'id': 'text', 'conversations': turn('Name a colour.', 'Blue.')}]
    (root / 'train.json').write_text(json.dumps(samples))
    return root

def dataset(data, tok, proc, mode, k=16, **kw):
    return LazySupervisedDataset(data / 'train.json', tok, 'phi', data, ImagePreprocess(proc, mode, PINS), k, **kw)

def test_split_tiles_count_size_order():
    "rows x cols tiles of the tower's size, row-major, then the global view; an image that fits one tile is not split."
    clip = toy_image_processor('clip', 32)
    pre = ImagePreprocess(clip, 'split')
    assert pre.split_grid((64, 64)) == (2, 2) and pre.split_grid((100, 40)) == (2, 4)
    assert pre.split_grid((30, 20)) == (0, 0)                                  # fits one tile: the global view only
    assert pre.split_grid((1000, 250)) == (1, 4)                              # scaled down to 4 tiles across
    assert ImagePreprocess(clip, 'split', max_side_tiles=2).split_grid((1000, 1000)) == (2, 2)
    tiles = pre(quadrants(64, 64))
    assert tiles.shape == (2 * 2 + 1, 3, 32, 32)
    mean = torch.tensor(clip.image_mean)[:, None, None]; std = torch.tensor(clip.image_std)[:, None, None]
    colours = [(t * std + mean).mean((1, 2)).round(decimals=1).tolist() for t in tiles[:4]]
    assert colours == [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]           # red, green / blue, white: row-major
    glob = (tiles[-1] * std + mean)
    assert glob[:, 4, 4].round(decimals=1).tolist() == [1, 0, 0]              # the whole image: red top left,
    assert glob[:, -4, -4].round(decimals=1).tolist() == [1, 1, 1]            # white bottom right
    assert pre(Image.new('RGB', (30, 20))).shape == (1, 3, 32, 32)

def test_split_image_text():
    assert split_image_text(2, 3) == ('<row_1_col_1><image><row_1_col_2><image><row_1_col_3><image>\n'
                                      '<row_2_col_1><image><row_2_col_2><image><row_2_col_3><image>\n'
                                      '\n<global-img><image>')
    assert split_image_text(0, 0) == '<global-img><image>'
    assert split_image_text(3, 1).count('<image>') == 4

def test_split_grid_from_header_not_draft(tmp_path):
    "A JPEG decoded small (`draft`) is still split by the size its file declares, which the dataset reads too."
    Image.new('RGB', (4008, 3006), 'white').save(tmp_path / 'big.jpg')
    pre = ImagePreprocess(toy_image_processor('clip', 32), 'split')
    assert image_size(tmp_path / 'big.jpg') == (4008, 3006) and pre.split_grid((4008, 3006)) == (3, 4)
    assert pre.open(tmp_path / 'big.jpg').shape == (13, 3, 32, 32)
    (tmp_path / 'bad.png').write_text('not an image')
    with pytest.raises(SampleError, match='unreadable image'): image_size(tmp_path / 'bad.png')

@pytest.mark.parametrize('mode', ['pad', 'split'])
def test_lengths_equal_encoded_length(data, mode):
    "`lengths` (tiles read from file headers) equals the encoded length with every slot as `num_image_tokens`."
    _, tok, proc = toy_tinyllava('phi', 'siglip')
    ds = dataset(data, tok, proc, mode)
    for i in range(len(ds)):
        ids = ds[i]['input_ids']; n = int((ids == I).sum())
        assert ds.lengths[i] == len(ids) - n + 16 * n
        images = ds[i]['images']
        assert (images is None and n == 0) or len(images) == n                 # an image item per slot
    if mode == 'split':
        assert ds[0]['images'].shape == (5 + 3, 3, 32, 32) and ds[1]['images'].shape == (2 * 4 + 1, 3, 32, 32)

def test_split_truncation_keeps_an_image_whole(data):
    "A cut among an image's tiles moves before its first tile; the images kept are whole."
    ids = torch.tensor([1, I, 2, I, I, I, 3, 4]); labels = torch.tensor([-100, -100, 2, -100, -100, -100, 3, 4])
    out, lab, n = truncate(ids, labels, 5 + 3, 2, [1, 3])                     # would keep 2 of the second's 3 tiles
    assert out.tolist() == [1, I, 2] and n == 1
    _, tok, proc = toy_tinyllava('phi', 'siglip')
    turns = [{'from': 'human', 'value': 'Image 1: <image> What is it?'}, {'from': 'gpt', 'value': 'Squares.'},
             {'from': 'human', 'value': 'Image 2: <image> And this?'}, {'from': 'gpt', 'value': 'Wide.'}]
    sample = {'id': 't', 'image': ['square.png', 'wide.png'], 'conversations': turns}
    (data / 'turns.json').write_text(json.dumps([sample]))
    load = lambda n: LazySupervisedDataset(data / 'turns.json', tok, 'phi', data, ImagePreprocess(proc, 'split'), 16,
                                           model_max_length=n)[0]
    full = load(10_000)['input_ids']
    slots, ends = (full == I).nonzero().flatten(), torch.where(full == I, 16, 1).cumsum(0)
    assert len(slots) == 5 + 3
    x = load(int(ends[slots[6]]))                               # room up to the second image's second tile
    assert x['input_ids'].tolist() == full[:slots[5]].tolist() and x['images'].shape == (5, 3, 32, 32)
    assert (x['labels'] != IGNORE_INDEX).any()                  # the first answer is still trained

@pytest.mark.parametrize('mode', ['pad', 'split', 'anyres'])
def test_two_images_train_padding_equals_packing(data, mode):
    "dataset -> collator -> model: loss and gradients of the padded batch equal the packed row's."
    model, tok, proc = toy_tinyllava('phi', 'siglip')
    ds = dataset(data, tok, proc, mode, model.num_image_tokens)
    items = [ds[i] for i in range(len(ds))]
    if mode == 'anyres': assert shapes(items[0]['images']) == [(5, 3, 32, 32), (3, 3, 32, 32)]   # unequal tiles: a list
    grads = []
    for packing in (False, True):
        model.zero_grad()
        batch = DataCollatorForSupervisedDataset(tok, packing=packing)(items)
        loss = model(**batch).loss; loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (lp, gp), (lk, gk) = grads
    assert torch.isfinite(lp)
    torch.testing.assert_close(lk, lp, atol=1e-5, rtol=1e-5)
    for a, b in zip(gp, gk): torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)

def test_collator_images_tensor_or_list():
    "A tensor when every sample's images concatenate, else a list with an item per slot, in order."
    a, b = torch.zeros(2, 3, 8, 8), torch.ones(1, 3, 8, 8)
    assert concat_images([a, None, b]).shape == (3, 3, 8, 8) and concat_images([None, None]) is None
    tiles = [torch.zeros(5, 3, 8, 8), torch.zeros(3, 3, 8, 8)]                # anyres: 1 + 4 and 1 + 2 tiles
    out = concat_images([tiles, torch.ones(1, 5, 3, 8, 8)])
    assert shapes(out) == [(5, 3, 8, 8), (3, 3, 8, 8), (5, 3, 8, 8)] and out[2].eq(1).all()

@pytest.mark.parametrize('mode', ['square', 'split'])
def test_naflex_samples_give_lists_and_train(data, mode):
    "With a NaFlex processor a sample's images are patch grids (a list), and the batch is a list the model takes."
    model, tok, proc = toy_tinyllava('phi', 'siglip2')
    ds = dataset(data, tok, proc, mode, model.num_image_tokens)
    want = [(4, 4, 192), (3, 5, 192)] if mode == 'square' else [(4, 4, 192)] * (5 + 3)   # 40 x 40, 64 x 32
    assert shapes(ds[0]['images']) == want
    batch = DataCollatorForSupervisedDataset(tok)([ds[i] for i in range(3)])
    assert isinstance(batch['images'], list) and len(batch['images']) == int((batch['input_ids'] == I).sum())
    assert torch.isfinite(model(**batch).loss)

@pytest.fixture(scope='module')
def toy():
    model, tok, proc = toy_tinyllava('phi', 'siglip')
    return model.eval(), tok, proc

def answer_of(model, tok, ids, images):
    out = model.generate(ids[None], images=images, max_new_tokens=5, do_sample=False)
    return tok.decode(out[0], skip_special_tokens=True).strip()

def test_chat_two_images(data, toy):
    model, tok, proc = toy
    pair = [Image.open(data / 'square.png'), Image.open(data / 'wide.png')]
    pre = ImagePreprocess(proc)
    ids = encode_question(QUESTION, tok, 'phi')['input_ids']
    assert int((ids == I).sum()) == 2
    got = chat(model, tok, proc, pair, QUESTION, max_new_tokens=5)
    assert got == answer_of(model, tok, ids, torch.stack([pre(x) for x in pair]))
    # the images are used, in order: swapped, the model sees other inputs (its first logits differ)
    logits = lambda ims: model(input_ids=ids[None], images=torch.stack([pre(x) for x in ims])).logits[0, -1]
    assert not torch.allclose(logits(pair), logits(pair[::-1]))

def test_chat_split_mode(data, toy):
    "In 'split' mode chat writes each image's tiles into the prompt, a slot per tile, as training does."
    model, tok, proc = toy
    model.config.image_aspect_ratio = 'split'
    try:
        pair = [Image.open(data / 'square.png'), Image.open(data / 'wide.png')]
        pre = ImagePreprocess(proc, 'split')
        texts = [split_image_text(*pre.split_grid(x.size)) for x in pair]
        ids = encode_question(QUESTION, tok, 'phi', image_texts=texts)['input_ids']
        assert int((ids == I).sum()) == 5 + 3
        want = answer_of(model, tok, ids, pre.slots([pre(x) for x in pair]))
        assert chat(model, tok, proc, pair, QUESTION, max_new_tokens=5) == want
        enc, pixels = question_inputs(pre, QUESTION, tok, 'phi', [data / 'square.png', data / 'wide.png'])   # files
        assert torch.equal(enc['input_ids'], ids) and torch.equal(pixels, pre.slots([pre(x) for x in pair]))
    finally: model.config.image_aspect_ratio = 'square'

def test_chat_count_mismatch(data, toy):
    model, tok, proc = toy
    img = Image.open(data / 'square.png')
    with pytest.raises(ValueError, match=r'1 image\(s\) given, but the conversation has 2 <image> slot\(s\)'):
        chat(model, tok, proc, [img], QUESTION)
    with pytest.raises(ValueError, match=r'3 image\(s\) given, but the conversation has 2'):
        chat(model, tok, proc, [img] * 3, QUESTION)
    with pytest.raises(ValueError, match=r"0 image\(s\) given.*the history's images come again"):
        chat(model, tok, proc, None, 'And now?', history=[('<image>\nWhat is it?', 'Red.')])
    assert isinstance(chat(model, tok, proc, [img], 'What is it?', max_new_tokens=2), str)   # one image goes first

def test_anyres_unequal_tiles_in_chat(data, toy):
    "anyres images with different tile counts in one prompt: a list of slots, each with its tiles."
    model, tok, proc = toy
    model.config.image_aspect_ratio, model.config.image_grid_pinpoints = 'anyres', PINS
    try:
        pair = [Image.open(data / 'square.png'), Image.open(data / 'wide.png')]
        pre = ImagePreprocess(proc, 'anyres', PINS)
        slots = pre.slots([pre(x) for x in pair])
        assert shapes(slots) == [(5, 3, 32, 32), (3, 3, 32, 32)]
        ids = encode_question(QUESTION, tok, 'phi')['input_ids']
        assert chat(model, tok, proc, pair, QUESTION, max_new_tokens=5) == answer_of(model, tok, ids, slots)
    finally: model.config.image_aspect_ratio, model.config.image_grid_pinpoints = 'square', None
