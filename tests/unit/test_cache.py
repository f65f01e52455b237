import json
import os

from medseg.runner.cache import ARTIFACT_FILE, DigestMemo, Manifest, StageCache, cache_key, canonical_json

BASE = {
    "stage": "train",
    "version": 1,
    "params": {"optim": {"lr": 0.001, "name": "adam"}, "epochs": 2},
    "input_digests": {"dataset": "a" * 64},
    "seed": 0,
    "versions": {"medseg": "0.1.0", "monai": "1.6.1", "torch": "2.13.0"},
}


def test_cache_key_is_sha256_of_canonical_payload():
    key = cache_key(**BASE)
    assert len(key) == 64 and int(key, 16) >= 0
    reordered = {**BASE, "params": {"epochs": 2, "optim": {"name": "adam", "lr": 0.001}}}
    assert cache_key(**reordered) == key
    assert canonical_json({"b": 1, "a": [1, 2]}) == '{"a":[1,2],"b":1}'


def test_cache_key_changes_with_each_ingredient():
    key = cache_key(**BASE)
    variants = [
        {"params": {**BASE["params"], "optim": {"lr": 0.002, "name": "adam"}}},
        {"input_digests": {"dataset": "b" * 64}},
        {"versions": {**BASE["versions"], "torch": "2.14.0"}},
        {"versions": {**BASE["versions"], "monai": "1.5.0"}},
        {"versions": {**BASE["versions"], "medseg": "0.2.0"}},
        {"version": 2},
        {"stage": "evaluate"},
        {"seed": 1},
    ]
    keys = {cache_key(**{**BASE, **variant}) for variant in variants}
    assert key not in keys and len(keys) == len(variants)


def test_tree_digest_covers_content_and_names_but_not_bookkeeping(tmp_path):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("one")
    (root / "sub" / "b.txt").write_text("two")
    memo = DigestMemo(tmp_path / "memo.sqlite")
    first = memo.tree_digest(root)
    (root / ARTIFACT_FILE).write_text(json.dumps({"ignored": True}))
    assert memo.tree_digest(root) == first
    (root / "sub" / "b.txt").write_text("TWO")
    changed = memo.tree_digest(root)
    assert changed != first
    (root / "sub" / "b.txt").rename(root / "sub" / "c.txt")
    assert memo.tree_digest(root) not in (first, changed)
    memo.close()


def test_file_digests_are_memoised_by_size_and_mtime(tmp_path):
    files = []
    for number in range(5):
        path = tmp_path / "data" / f"f{number}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(bytes([number]) * 1000)
        files.append(path)
    memo = DigestMemo(tmp_path / "memo.sqlite")
    memo.tree_digest(tmp_path / "data")
    assert memo.files_hashed == 5
    memo.close()
    again = DigestMemo(tmp_path / "memo.sqlite")
    digest = again.tree_digest(tmp_path / "data")
    assert again.files_hashed == 0  # every file answered from the memo
    files[0].write_bytes(b"x" * 1001)
    assert again.tree_digest(tmp_path / "data") != digest
    assert again.files_hashed == 1
    again.close()


def test_tree_digest_does_not_follow_directory_symlink_loops(tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    (root / "a.txt").write_text("one")
    (root / "loop").symlink_to(root, target_is_directory=True)
    memo = DigestMemo(tmp_path / "memo.sqlite")
    assert len(memo.tree_digest(root)) == 64
    memo.close()


def _manifest(key: str, stage: str) -> Manifest:
    return Manifest(key, stage, 1, {}, {}, {"model": "d" * 64}, {}, "run", {})


def test_a_commit_never_writes_through_a_hard_link_into_another_entry(tmp_path):
    """A stage that hard-links its input's files (postprocess: the weights) leaves that entry as it was."""
    cache = StageCache(tmp_path / "cache")
    with cache.staging("a" * 64, ["model"]) as staged:
        (staged["model"] / "weights.pt").write_bytes(b"w")
        first = cache.commit(staged, _manifest("a" * 64, "train"))
    record = (first / "model" / ARTIFACT_FILE).read_text()
    with cache.staging("b" * 64, ["model"]) as staged:
        for name in ("weights.pt", ARTIFACT_FILE):
            os.link(first / "model" / name, staged["model"] / name)
        second = cache.commit(staged, _manifest("b" * 64, "postprocess"))
    assert (first / "model" / ARTIFACT_FILE).read_text() == record  # before: rewritten as postprocess's
    assert json.loads(record)["stage"] == "train"
    assert json.loads((second / "model" / ARTIFACT_FILE).read_text())["stage"] == "postprocess"
    assert (second / "model" / "weights.pt").samefile(first / "model" / "weights.pt")
