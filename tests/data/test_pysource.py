"""The byte-level corpus: hash splits, windows, epoch-seeded sampling, recorded figures and every bad input."""

import os
import platform
import random
import re
import sysconfig
from pathlib import Path

import pytest
import torch
from _checks import CONF

from lightning_prune.data import PySourceDataModule
from lightning_prune.data.pysource import (
    SEPARATOR,
    ByteWindows,
    RandomOffsetSampler,
    assign_splits,
    stdlib_root,
)


def write_corpus(root: Path, count: int = 60, order: list[int] | None = None) -> dict[str, bytes]:
    """``count`` small Python-like files in a few sub-folders, written in ``order``; returns {relative path: bytes}."""
    files = {}
    for i in order if order is not None else range(count):
        relative = f"pkg{i % 3}/mod{i}.py"
        text = f"# module {i}\n" + "".join(f"def f{j}(x):\n    return x * {i + j}\n" for j in range(i % 5 + 2))
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        files[relative] = text.encode()
    return files


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    return tmp_path, write_corpus(tmp_path)


def _module(root: Path, **kwargs) -> PySourceDataModule:
    options = {"seq_len": 16, "batch_size": 4, "val_fraction": 0.2, "test_fraction": 0.2, **kwargs}
    return PySourceDataModule(root=root, **options)


# --- splits ----------------------------------------------------------------------------------------------------


def test_the_split_is_a_fixed_function_of_the_path():
    # Pinned: SHA-256 of the path, first 8 bytes over 2**64 (os.py 0.851, asyncio/tasks.py 0.147, re/_parser.py
    # 0.242, ...). A change of hash or of threshold order would move files between splits on every machine.
    names = ["os.py", "json/__init__.py", "asyncio/tasks.py", "collections/__init__.py", "re/_parser.py", "typing.py"]
    names += ["argparse.py", "pathlib.py"]
    assert assign_splits(names, val_fraction=0.2, test_fraction=0.4) == {
        "train": ["argparse.py", "os.py", "typing.py"],
        "val": ["asyncio/tasks.py", "collections/__init__.py"],
        "test": ["json/__init__.py", "pathlib.py", "re/_parser.py"],
    }


def test_the_split_ignores_listing_order_other_files_and_global_random_state():
    names = [f"lib/m{i}.py" for i in range(300)]
    reference = assign_splits(names, 0.1, 0.1)
    shuffled = names[:]
    random.Random(1).shuffle(shuffled)
    torch.manual_seed(123)
    random.seed(456)
    assert assign_splits(shuffled, 0.1, 0.1) == reference
    # Adding or removing files never moves another one.
    fewer = assign_splits(names[:100], 0.1, 0.1)
    assert all(set(fewer[s]) == set(reference[s]) & set(names[:100]) for s in reference)


def test_split_fractions_are_respected_in_expectation():
    splits = assign_splits([f"f{i}.py" for i in range(4000)], val_fraction=0.1, test_fraction=0.2)
    assert len(splits["val"]) == pytest.approx(400, abs=60)
    assert len(splits["test"]) == pytest.approx(800, abs=80)


def test_datamodule_files_are_the_same_however_the_directory_was_written(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_corpus(a, order=list(range(60)))
    write_corpus(b, order=list(reversed(range(60))))
    files_a = {s: [p.relative_to(a).as_posix() for p in paths] for s, paths in _module(a).files().items()}
    files_b = {s: [p.relative_to(b).as_posix() for p in paths] for s, paths in _module(b).files().items()}
    assert files_a == files_b
    assert files_a == assign_splits(files_a["train"] + files_a["val"] + files_a["test"], 0.2, 0.2)


def test_stdlib_splits_are_disjoint_and_cover_every_source_file_outside_site_packages():
    dm = PySourceDataModule()
    assert dm.root == stdlib_root() == Path(sysconfig.get_paths()["stdlib"])
    files = dm.files()
    sets = {split: set(paths) for split, paths in files.items()}
    assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
    everything = set().union(*sets.values())
    expected = {p for p in dm.root.rglob("*.py") if p.is_file() and "site-packages" not in p.relative_to(dm.root).parts}
    assert everything == expected and len(everything) > 500
    assert all(p.suffix == ".py" for p in everything)
    assert len(sets["val"]) < len(sets["train"]) / 5 and len(sets["test"]) < len(sets["train"]) / 5


def test_site_packages_and_non_matching_files_are_excluded(tmp_path):
    files = write_corpus(tmp_path)
    for extra in ("site-packages/pkg/x.py", "dist-packages/y.py", "__pycache__/z.py", "notes.txt", "mod.pyc"):
        (tmp_path / extra).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / extra).write_text("x = 1\n")
    found = {p.relative_to(tmp_path).as_posix() for paths in _module(tmp_path).files().values() for p in paths}
    assert found == set(files)
    for i in range(30):
        (tmp_path / "texts" / f"t{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "texts" / f"t{i}.txt").write_text(f"line {i}\n")
    texts = {
        p.relative_to(tmp_path).as_posix() for ps in _module(tmp_path, pattern="*.txt").files().values() for p in ps
    }
    assert texts == {"notes.txt", *(f"texts/t{i}.txt" for i in range(30))}


# --- data and windows ------------------------------------------------------------------------------------------


def test_each_split_is_its_files_in_path_order_each_followed_by_a_separator(corpus):
    root, files = corpus
    dm = _module(root)
    dm.setup()
    for split, paths in dm.files().items():
        expected = b"".join(files[p.relative_to(root).as_posix()] + bytes([SEPARATOR]) for p in paths)
        assert bytes(dm.data[split].tolist()) == expected
        assert dm.num_files[split] == len(paths) and dm.num_bytes[split] == len(expected)
    assert sum(dm.num_bytes.values()) == sum(len(b) + 1 for b in files.values())


def test_windows_are_next_byte_pairs():
    data = torch.randint(0, 256, (100,), dtype=torch.uint8)
    windows = ByteWindows(data, seq_len=10)
    assert len(windows) == 90
    for i in (0, 37, 89):
        x, y = windows[i]
        assert x.dtype == y.dtype == torch.int64
        assert torch.equal(x, data[i : i + 10].long()) and torch.equal(y, data[i + 1 : i + 11].long())
    with pytest.raises(IndexError):
        windows[90]


def test_training_batches_are_windows_of_the_training_bytes(corpus):
    root, _ = corpus
    dm = _module(root, seq_len=12, batch_size=5)
    dm.setup()
    train = bytes(dm.data["train"].tolist())
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (5, 12)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        window = bytes(row_x.tolist()) + bytes(row_y[-1:].tolist())
        assert window in train


def test_evaluation_windows_are_fixed_non_overlapping_and_cover_the_split(corpus):
    root, _ = corpus
    dm = _module(root, seq_len=8, batch_size=3)
    dm.setup()
    for split, loader in (("val", dm.val_dataloader()), ("test", dm.test_dataloader())):
        data = dm.data[split]
        xs = torch.cat([x for x, _ in loader])
        ys = torch.cat([y for _, y in loader])
        count = (data.numel() - 1) // 8
        assert len(xs) == count == dm.num_windows[split]
        # Consecutive, non-overlapping windows: together they are the split's first count * 8 bytes.
        assert torch.equal(xs.flatten(), data[: count * 8].long())
        assert torch.equal(ys.flatten(), data[1 : count * 8 + 1].long())
        again = torch.cat([x for x, _ in (dm.val_dataloader() if split == "val" else dm.test_dataloader())])
        assert torch.equal(again, xs)


def test_max_eval_windows_thins_the_windows_evenly(corpus):
    root, _ = corpus
    full, capped = _module(root, seq_len=4), _module(root, seq_len=4, max_eval_windows=5)
    full.setup()
    capped.setup()
    assert full.num_windows["val"] > 20 and capped.num_windows["val"] == 5
    all_windows = torch.cat([x for x, _ in full.val_dataloader()])
    kept = torch.cat([x for x, _ in capped.val_dataloader()])
    n = len(all_windows)
    assert torch.equal(kept, all_windows[[i * n // 5 for i in range(5)]])  # spread over the split, not its head


def test_training_offsets_are_epoch_seeded(corpus):
    root, _ = corpus
    dm = _module(root, samples_per_epoch=40, seed=3)
    dm.setup()
    loader = dm.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, RandomOffsetSampler) and len(sampler) == 40 == dm.num_windows["train"]

    def epoch(e: int, global_seed: int) -> torch.Tensor:
        sampler.set_epoch(e)
        with torch.random.fork_rng(devices=[]):  # the global generator in another state for each call, restored
            torch.manual_seed(global_seed)
            return torch.cat([x for x, _ in loader])

    # Another epoch under the same global state gives other windows; the same epoch under another global state
    # gives the same ones: a sampler that drew from the global generator fails one of the two.
    first, second = epoch(0, global_seed=7), epoch(1, global_seed=7)
    assert first.shape == (40, 16)
    assert not torch.equal(first, second)
    assert torch.equal(epoch(0, global_seed=8), first) and torch.equal(epoch(1, global_seed=9), second)
    other_seed = _module(root, samples_per_epoch=40, seed=4)
    other_seed.setup()
    assert not torch.equal(torch.cat([x for x, _ in other_seed.train_dataloader()]), first)


def test_random_offset_sampler_covers_its_range():
    sampler = RandomOffsetSampler(num_offsets=7, num_samples=500, seed=0)
    drawn = list(sampler)
    assert len(drawn) == 500 and set(drawn) == set(range(7))


def test_samples_per_epoch_defaults_to_one_pass_over_the_training_bytes(corpus):
    root, _ = corpus
    dm = _module(root, seq_len=10)
    dm.setup()
    assert len(dm.train_dataloader().sampler) == (dm.num_bytes["train"] - 1) // 10


def test_hparams_record_the_python_version_and_each_split(corpus):
    root, _ = corpus
    dm = _module(root, max_eval_windows=3)
    assert dm.hparams["root"] == str(root) and dm.hparams["vocab_size"] == 256 and dm.input_shape == (16,)
    dm.setup()
    assert dm.python_version == platform.python_version() == dm.hparams["python_version"]
    for split in ("train", "val", "test"):
        assert dm.hparams[f"{split}_files"] == dm.num_files[split] > 0
        assert dm.hparams[f"{split}_bytes"] == dm.num_bytes[split] > 0
        assert dm.hparams[f"{split}_windows"] == dm.num_windows[split]
    assert dm.num_windows["val"] == dm.num_windows["test"] == 3


def test_a_loader_before_setup_says_so(corpus):
    with pytest.raises(RuntimeError, match=r"call `setup\(\)` before asking for a dataloader"):
        _module(corpus[0]).train_dataloader()


# --- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seq_len": 0}, r"`seq_len` must be an integer >= 1, got 0"),
        ({"seq_len": 2.5}, r"`seq_len` must be an integer >= 1, got 2\.5"),
        ({"batch_size": 0}, r"`batch_size` must be an integer >= 1, got 0"),
        ({"val_fraction": 0.0}, r"`val_fraction` must be in the open interval \(0, 1\), got 0\.0"),
        ({"test_fraction": 1.5}, r"`test_fraction` must be in the open interval \(0, 1\), got 1\.5"),
        ({"val_fraction": 0.6, "test_fraction": 0.4}, r"`val_fraction` \+ `test_fraction` must be < 1 to leave"),
        ({"samples_per_epoch": 0}, r"`samples_per_epoch` must be an integer >= 1, got 0"),
        ({"max_eval_windows": -1}, r"`max_eval_windows` must be an integer >= 1, got -1"),
        ({"num_workers": -1}, r"`num_workers` must be an integer >= 0, got -1"),
        ({"seed": "zero"}, r"`seed` must be an integer, got 'zero'"),
        ({"pattern": "src/*.py"}, r"`pattern` must be a non-empty glob on file names.*got 'src/\*\.py'"),
        ({"pattern": ""}, r"`pattern` must be a non-empty glob"),
        ({"vocab_size": 255}, r"`vocab_size` must be 256 for PySourceDataModule \(fixed by the dataset\), got 255"),
    ],
)
def test_bad_arguments(kwargs, match, tmp_path):
    write_corpus(tmp_path, count=3)
    with pytest.raises(ValueError, match=match):
        PySourceDataModule(root=tmp_path, **kwargs)


def test_a_missing_root_or_a_file_as_root(tmp_path):
    with pytest.raises(ValueError, match=r"`root` must be an existing directory .*which does not exist\. Set it to"):
        PySourceDataModule(root=tmp_path / "nowhere")
    (tmp_path / "file.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"`root` must be an existing directory .*which is not a directory"):
        PySourceDataModule(root=tmp_path / "file.py")
    with pytest.raises(ValueError, match=r"`root` must be a directory path or None"):
        PySourceDataModule(root=3)  # type: ignore[arg-type]


def test_a_root_without_matching_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello\n")
    dm = PySourceDataModule(root=tmp_path)
    with pytest.raises(ValueError, match=r"has no file matching `pattern`='\*\.py' .*change `pattern`"):
        dm.setup()


def test_an_empty_split_names_the_fraction_to_change(tmp_path):
    (tmp_path / "only.py").write_text("x = 1\n" * 100)
    assert assign_splits(["only.py"], 0.05, 0.05)["train"] == ["only.py"]
    with pytest.raises(
        ValueError, match=r"The val split of the 1 files .* is empty .*add files or raise `val_fraction`"
    ):
        PySourceDataModule(root=tmp_path).setup()
    held_out = next(f"f{i}.py" for i in range(100) if not assign_splits([f"f{i}.py"], 0.45, 0.45)["train"])
    (tmp_path / "only.py").rename(tmp_path / held_out)
    with pytest.raises(ValueError, match=r"The train split .* empty .*lower `val_fraction` and `test_fraction`"):
        PySourceDataModule(root=tmp_path, val_fraction=0.45, test_fraction=0.45).setup()


def test_a_split_shorter_than_one_window(corpus):
    root, _ = corpus
    with pytest.raises(
        ValueError, match=r"split holds \d+ bytes .*fewer than `seq_len` \+ 1 = 100001: lower `seq_len`"
    ):
        _module(root, seq_len=100_000).setup()


def test_bad_windows():
    with pytest.raises(ValueError, match=r"`data` must be a 1-D uint8 tensor of at least seq_len \+ 1 = 9 bytes"):
        ByteWindows(torch.zeros(8, dtype=torch.uint8), seq_len=8)
    with pytest.raises(ValueError, match=r"`starts` must lie in \[0, 1\]"):
        ByteWindows(torch.zeros(10, dtype=torch.uint8), seq_len=8, starts=torch.tensor([2]))


def test_the_default_corpus_is_this_interpreters_standard_library():
    root = stdlib_root()
    assert (root / "os.py").is_file()
    assert re.fullmatch(r"python3\.\d+", root.name) or os.name == "nt" or root.name == "Lib"


def test_the_data_config_composes_and_instantiates(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    conf = CONF
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["data=pysource", "seed=5"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, PySourceDataModule) and dm.root == stdlib_root() and dm.seed == 5
    assert dm.input_shape == (cfg.data.seq_len,) and dm.vocab_size == cfg.data.vocab_size == 256
    write_corpus(tmp_path)
    cfg.data.root, cfg.data.val_fraction, cfg.data.test_fraction = str(tmp_path), 0.2, 0.2
    dm = instantiate(cfg.data)
    dm.setup()
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (cfg.data.batch_size, cfg.data.seq_len)
    assert len(dm.train_dataloader().sampler) == cfg.data.samples_per_epoch
