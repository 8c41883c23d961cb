"Training never loses a model or a checkpoint, never mixes two runs in one folder, and takes its arguments exactly."
import os, signal, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch, transformers
transformers.utils.logging.disable_progress_bar()
from transformers import TrainerCallback
from tinyllava_nb.world import make_world
from tinyllava_nb.train import run
from tinyllava_nb.train.run import LOCK_FILE, check_args, lock_output_dir, parse_args, resume_point, train
from tinyllava_nb.train.trainer import checkpoints, is_complete, param_groups

QUIET = ['--use_cpu', 'true', '--report_to', 'none', '--disable_tqdm', 'true', '--per_device_train_batch_size', '4']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp('data'), n_train=16, n_eval=4)

def job(data, out, *flags) -> list:
    "A full finetune of 8 steps into `out` that saves every 4; later flags override."
    return ['--data_path', str(data['finetune']), '--conv_version', 'phi', '--tune_type_llm', 'full', '--learning_rate', '3e-3',
            '--max_steps', '8', '--save_strategy', 'steps', '--save_steps', '4', '--seed', '3', '--output_dir', str(out)] + QUIET + list(flags)

def losses(out):
    import json
    return [h['loss'] for h in json.loads((Path(out) / 'trainer_state.json').read_text())['log_history'] if 'loss' in h]

def names(paths): return [Path(p).name for p in paths]

class Killed(Exception): pass

class DieAfterSave(TrainerCallback):
    "The run dies right after it saved checkpoint `step`: checkpoints, no final model."
    def __init__(self, step): self.step = step
    def on_save(self, args, state, control, **kw):
        if state.global_step == self.step: raise Killed(f'killed after checkpoint-{self.step}')

def stopped_run(data, out, step=8, *flags):
    "A run of 12 steps killed after saving checkpoint `step`."
    with pytest.raises(Killed): train(*parse_args(job(data, out, '--max_steps', '12', *flags)), callbacks=[DieAfterSave(step)])
    assert not (out / 'model.safetensors').exists()

def test_auto_resume_never_retrains_a_finished_model(data, tmp_path, monkeypatch):
    out = tmp_path / 'finished'
    train(*parse_args(job(data, out, '--save_strategy', 'no', '--max_steps', '2')))
    before = (out / 'model.safetensors').read_bytes()
    monkeypatch.setattr(run, 'build_model', lambda *a: pytest.fail('a model was built'))
    with pytest.raises(ValueError, match=f'output_dir {out} already holds a model .* would train it again from scratch'):
        train(*parse_args(job(data, out, '--resume_from_checkpoint', 'auto')))
    assert (out / 'model.safetensors').read_bytes() == before

def test_new_run_in_a_stopped_runs_folder(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'stopped'
    stopped_run(data, out)
    before = sorted(os.listdir(out))
    with monkeypatch.context() as m:
        m.setattr(run, 'build_model', lambda *a: pytest.fail('a model was built'))
        with pytest.raises(ValueError, match=r'holds checkpoints of an earlier run \(checkpoint-4, checkpoint-8\): pass '
                                             '--resume_from_checkpoint auto to continue it, or pass --overwrite_output_dir true'):
            train(*parse_args(job(data, out)))
    assert sorted(os.listdir(out)) == before
    # overwrite: the old checkpoints go before the new run saves any, so none of them can be mixed in or resumed
    train(*parse_args(job(data, out, '--overwrite_output_dir', 'true', '--max_steps', '6', '--save_steps', '3')))
    assert "removed the earlier run's checkpoint-4, checkpoint-8" in capsys.readouterr().out
    assert names(checkpoints(out)[0]) == ['checkpoint-3', 'checkpoint-6'] and checkpoints(out)[1] == []
    assert resume_point(parse_args(job(data, out, '--resume_from_checkpoint', 'auto'))[2]) == str(out / 'checkpoint-6')

def test_resume_and_overwrite_together_are_refused(data, tmp_path):
    with pytest.raises(ValueError, match='pass one of them'):
        check_args(*parse_args(job(data, tmp_path / 'x', '--resume_from_checkpoint', 'auto', '--overwrite_output_dir', 'true')))

def test_a_second_run_in_the_same_folder_is_refused(data, tmp_path):
    out = tmp_path / 'shared'
    class SecondRun(TrainerCallback):
        "While the run trains, start another one (the CLI, in its own process) in the same output_dir."
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                self.result = subprocess.run(['tinyllava-nb', 'train', *job(data, out)], capture_output=True, text=True,
                                             env=ENV, timeout=600)
    second = SecondRun()
    train(*parse_args(job(data, out)), callbacks=[second])
    r = second.result
    assert r.returncode == 2 and f'output_dir {out} is in use by another training run' in r.stderr, r.stderr[-3000:]
    assert len(losses(out)) == 8 and names(checkpoints(out)[0]) == ['checkpoint-4', 'checkpoint-8']

def test_lock_is_held_by_the_main_process_only(tmp_path):
    out = tmp_path / 'x'
    with lock_output_dir(out, main=False): assert not out.exists()                # a rank > 0 takes no lock
    with lock_output_dir(out, main=False), lock_output_dir(out): pass              # nor blocks the main process

KILLED = textwrap.dedent('''
    import os, signal, sys
    from transformers import Trainer
    from tinyllava_nb.train.run import main
    save = Trainer._save_optimizer_and_scheduler
    def dying(self, output_dir):                   # checkpoint-8's model is written, its optimizer and state are not
        if self.state.global_step == 8: os.kill(os.getpid(), signal.SIGKILL)
        save(self, output_dir)
    Trainer._save_optimizer_and_scheduler = dying
    main(sys.argv[1:])
''')

def test_killed_while_saving(data, tmp_path, capsys):
    script, out = tmp_path / 'killed.py', tmp_path / 'killed'
    script.write_text(KILLED)
    r = subprocess.run([sys.executable, str(script), *job(data, out, '--max_steps', '12')], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    assert sorted(os.listdir(out)) == ['.tmp-checkpoint-8', 'checkpoint-4', LOCK_FILE]   # no torn checkpoint-8
    assert list((out / '.tmp-checkpoint-8' / 'checkpoint-8').glob('*.safetensors'))      # the save was cut half-way
    # the killed run's lock died with it; auto continues from the newest complete checkpoint
    train(*parse_args(job(data, out, '--max_steps', '12', '--resume_from_checkpoint', 'auto')))
    assert f'resuming from {out / "checkpoint-4"}' in capsys.readouterr().out
    train(*parse_args(job(data, tmp_path / 'whole', '--max_steps', '12')))
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(tmp_path / 'whole')), rtol=1e-4, atol=1e-5)
    assert names(checkpoints(out)[0]) == ['checkpoint-4', 'checkpoint-8', 'checkpoint-12']
    assert not list(out.glob('.tmp-*'))

def test_auto_skips_a_torn_checkpoint(data, tmp_path, capsys):
    out = tmp_path / 'torn'
    stopped_run(data, out)
    for f in ('trainer_state.json', 'optimizer.pt'): (out / 'checkpoint-8' / f).unlink()   # as a save cut short elsewhere
    assert not is_complete(out / 'checkpoint-8') and is_complete(out / 'checkpoint-4')
    train(*parse_args(job(data, out, '--max_steps', '12', '--resume_from_checkpoint', 'auto')))
    assert f'resuming from {out / "checkpoint-4"} (skipped as incomplete: checkpoint-8)' in capsys.readouterr().out
    assert len(losses(out)) == 12
    assert names(checkpoints(out)[0]) == ['checkpoint-4', 'checkpoint-8', 'checkpoint-12']   # checkpoint-8 saved whole again

def test_auto_with_only_torn_checkpoints_is_refused(data, tmp_path):
    out = tmp_path / 'all-torn'
    stopped_run(data, out, 4)
    (out / 'checkpoint-4' / 'trainer_state.json').unlink()
    with pytest.raises(ValueError, match=r'holds no complete checkpoint to resume from \(checkpoint-4'):
        check_args(*parse_args(job(data, out, '--resume_from_checkpoint', 'auto')))

def test_resume_path_must_be_complete_and_of_this_run(data, tmp_path):
    out = tmp_path / 'stopped'
    stopped_run(data, out)
    (out / 'checkpoint-8' / 'trainer_state.json').write_text('{"global_step": 4}')      # another step's state
    with pytest.raises(ValueError, match='is not a complete checkpoint'):
        check_args(*parse_args(job(data, out, '--resume_from_checkpoint', str(out / 'checkpoint-8'))))
    with pytest.raises(ValueError, match='does not exist'):
        check_args(*parse_args(job(data, out, '--resume_from_checkpoint', str(out / 'checkpoint-9'))))
    other = tmp_path / 'other'; other.mkdir(); (other / 'model.safetensors').write_bytes(b'mine')
    with pytest.raises(ValueError, match=f'is not a checkpoint of output_dir {other}, which holds another run'):
        check_args(*parse_args(job(data, other, '--resume_from_checkpoint', str(out / 'checkpoint-4'))))
    assert resume_point(parse_args(job(data, tmp_path / 'new', '--resume_from_checkpoint', str(out / 'checkpoint-4')))[2])

@pytest.mark.parametrize('flags', [['--max_step', '2'], ['--max-step', '2'], ['--learning_rat=1e-3']])
def test_flags_are_exact(flags):
    with pytest.raises(ValueError, match=f'unknown argument {flags[0]} \\(did you mean --'): parse_args(flags)

def test_yaml_keys_are_exact(tmp_path):
    (tmp_path / 'run.yaml').write_text('max_step: 2\n')
    with pytest.raises(ValueError, match=r'unknown argument --max_step \(did you mean --max_steps\?\)'):
        parse_args([str(tmp_path / 'run.yaml')])

BAD_NUMBERS = {('--max_steps', '-5'): 'max_steps must be', ('--max_steps', '0'): 'max_steps must be',
               ('--num_train_epochs', '0'): 'num_train_epochs must be > 0', ('--learning_rate', '-0.0001'): 'learning_rate must be >= 0',
               ('--mm_projector_lr', '-1'): 'mm_projector_lr must be >= 0', ('--per_device_train_batch_size', '0'): 'per_device_train_batch_size',
               ('--gradient_accumulation_steps', '0'): 'gradient_accumulation_steps must be >= 1',
               ('--save_strategy', 'steps', '--save_steps', '0'): 'needs save_steps > 0'}

@pytest.mark.parametrize('flags,message', list(BAD_NUMBERS.items()), ids=[' '.join(f) for f in BAD_NUMBERS])
def test_numbers_that_would_be_misread(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message): parse_args(['--output_dir', str(tmp_path), '--use_cpu', 'true', *flags])

def test_numbers_that_are_fine(tmp_path):
    t = parse_args(['--output_dir', str(tmp_path), '--use_cpu', 'true', '--max_steps', '5', '--num_train_epochs', '0'])[2]
    assert t.max_steps == 5

def test_zero_learning_rate_of_a_part_is_kept():
    nn = torch.nn
    class Parts(nn.Module):
        def __init__(self): super().__init__(); self.connector, self.language_model = nn.Linear(2, 2), nn.Linear(2, 2)
    assert sorted(g['lr'] for g in param_groups(Parts(), 1e-3, 0.0, set(), mm_projector_lr=0.0)) == [0.0, 1e-3]

def test_output_dir_that_is_a_file(data, tmp_path):
    f = tmp_path / 'notes.txt'; f.write_text('mine')
    with pytest.raises(ValueError, match=f'output_dir {f} is a file'): check_args(*parse_args(job(data, f)))
    with pytest.raises(ValueError, match=f'output_dir {f / "run"} is inside a file, {f}'): check_args(*parse_args(job(data, f / 'run')))
    r = subprocess.run(['tinyllava-nb', 'train', *job(data, f)], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 2 and f'output_dir {f} is a file' in r.stderr and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert f.read_text() == 'mine'

def test_best_checkpoint_is_named_by_its_final_folder(data, tmp_path):
    "load_best_model_at_end: the best checkpoint is recorded (and kept by rotation) under checkpoint-N, not its staging name."
    import json
    from tinyllava_nb.data.dataset import DataCollatorForSupervisedDataset, LazySupervisedDataset
    from tinyllava_nb.data.image import ImagePreprocess
    from tinyllava_nb.model.tinyllava import toy_tinyllava
    from tinyllava_nb.train.trainer import TinyLlavaTrainer, TrainingArguments
    model, tok, proc = toy_tinyllava('phi', 'siglip', 'mlp2x_gelu')
    ds = LazySupervisedDataset(data['finetune'], tok, 'phi', data['root'], ImagePreprocess(proc, 'pad'), model.num_image_tokens)
    out = tmp_path / 'best'
    args = TrainingArguments(output_dir=str(out), max_steps=8, per_device_train_batch_size=8, learning_rate=3e-3, use_cpu=True,
                             report_to='none', disable_tqdm=True, save_strategy='steps', save_steps=2, eval_strategy='steps',
                             eval_steps=2, save_total_limit=1, load_best_model_at_end=True, metric_for_best_model='loss',
                             greater_is_better=True)      # the worst loss is "best": an old checkpoint must survive
    t = TinyLlavaTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, data_collator=DataCollatorForSupervisedDataset(tok))
    t.train()
    assert t.state.best_model_checkpoint == str(out / 'checkpoint-2')
    assert json.loads((out / 'checkpoint-2' / 'trainer_state.json').read_text())['best_model_checkpoint'] == str(out / 'checkpoint-2')
    assert names(checkpoints(out)[0]) == ['checkpoint-2'] and not list(out.glob('.tmp-*'))
