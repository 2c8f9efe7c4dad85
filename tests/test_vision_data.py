"""Vision-language rows through validation: every image spelling, the coded image rejects, the
content-addressed store, image hashes in the example id, image tokens expanded by the processor
and never cut by truncation."""

import hashlib
import io
import json

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_contracts.config import DataConfig
from data_contracts.validation import read_valid, validate_split
from tiny import tiny_tokenizer
from tiny_vlm import color_image, color_rows, tiny_vlm, write_jsonl

LOOSE = dict(max_invalid_fraction=1.0, max_length=96)


@pytest.fixture(scope="module")
def llava():
    return tiny_vlm("llava")[1]


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _row(image=None, images=None, text="What color is the square?", completion="Answer: red", parts=True):
    content = [{"type": "image"}, {"type": "text", "text": text}] if parts else text
    row = {"prompt": [{"role": "user", "content": content}],
           "chosen": [{"role": "assistant", "content": completion}],
           "rejected": [{"role": "assistant", "content": "Answer: blue"}]}
    if image is not None:
        row["image"] = image
    if images is not None:
        row["images"] = images
    return row


def _validate(source, out, proc, **cfg):
    rep = validate_split(source, out, proc.tokenizer if proc is not None else tiny_tokenizer(),
                         DataConfig(**{**LOOSE, **cfg}), processor=proc)
    rejects = pd.read_parquet(out / "rejects.parquet")
    return rep, read_valid(out / "valid.parquet"), dict(zip(rejects["source_index"], rejects["code"]))


def test_every_image_spelling_is_read_stored_and_hashed(tmp_path, llava):
    red, blue = color_image("red", 1), color_image("blue", 2)
    (tmp_path / "red.png").write_bytes(_png(red))
    rows = [_row(image=str(tmp_path / "red.png")),            # 0 a path
            _row(image=_png(blue)),                           # 1 bytes
            _row(image={"bytes": _png(blue), "path": None}),  # 2 HF datasets' dict: same image as 1
            _row(image={"bytes": None, "path": str(tmp_path / "red.png")}, text="Which color?"),  # 3
            _row(image=blue, text="Color?"),                  # 4 a PIL image
            _row(images=[_png(red), _png(blue)], text="Two?"),  # 5 no placeholder for 2 images
            _row(images=[_png(red)], text="Placed for me?", parts=False)]  # 6 placeholder inserted
    rows[5]["prompt"][0]["content"] = "Two?"
    rep, valid, rejects = _validate(rows, tmp_path / "out", llava)
    assert rejects == {2: "DUPLICATE_ROW"}  # same text and same image bytes as row 1
    assert rep["valid"] == 6
    refs = [json.loads(v) for v in valid["images"]]
    assert [len(r) for r in refs] == [1, 1, 1, 1, 2, 1]
    for r in (x for rs in refs for x in rs):  # content-addressed copies, absolute once read back
        data = open(r["path"], "rb").read()
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and f"/images/{r['sha256'][:2]}/" in r["path"]
        assert (r["width"], r["height"]) == (40, 32)
    stored = pq.read_table(tmp_path / "out" / "valid.parquet")
    assert json.loads(stored["images"][0].as_py())[0]["path"].startswith("images/")  # relative on disk
    assert "pixel_values" not in stored.schema.names and stored.nbytes < 20_000
    image_id = llava.image_token_id
    n_tokens = [ids.tolist().count(image_id) for ids in valid["prompt_input_ids"]]
    assert n_tokens == [4, 4, 4, 4, 8, 4]  # 2x2 patches + CLS - CLS ("default" strategy) per image
    prompt6 = json.loads(valid["prompt"].iloc[5])[0]["content"]
    assert prompt6[0] == {"type": "image"} and prompt6[1]["text"] == "Placed for me?"


def test_example_id_holds_the_image_hash(tmp_path, llava):
    rows = [_row(image=_png(color_image("red", 1))), _row(image=_png(color_image("red", 7)))]
    rep, valid, rejects = _validate(rows, tmp_path / "out", llava)
    assert rep["valid"] == 2 and not rejects and valid["example_id"].nunique() == 2


def test_image_rejects_are_coded(tmp_path, llava):
    good = _png(color_image("red", 1))
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "cut.png").write_bytes(good[:len(good) // 2])
    (tmp_path / "text.png").write_text("not an image")
    big = color_image("red", 3, size=(400, 300))
    (tmp_path / "good.png").write_bytes(good)
    standard = {"prompt": "2+2?", "chosen": " 4", "rejected": " 5", "image": "good.png"}
    rows = [_row(image=str(tmp_path / "missing.png")), _row(image=str(tmp_path / "empty.png")),
            _row(image=str(tmp_path / "cut.png")), _row(image=str(tmp_path / "text.png")),
            _row(image=_png(big)), _row(images=[good, good]), _row(image=None), _row(image=good),
            {**_row(image=good), "chosen": [{"role": "assistant", "content": [{"type": "image"}]}]}]
    write_jsonl(tmp_path / "standard.jsonl", [standard])
    rep, valid, rejects = _validate(rows, tmp_path / "out", llava, max_image_pixels=100_000)
    assert rejects == {0: "IMAGE_MISSING", 1: "IMAGE_EMPTY", 2: "IMAGE_TRUNCATED", 3: "IMAGE_UNREADABLE",
                       4: "IMAGE_TOO_LARGE", 5: "IMAGE_COUNT_MISMATCH", 6: "IMAGE_COUNT_MISMATCH",
                       8: "IMAGE_IN_COMPLETION"}
    assert rep["valid"] == 1
    _, _, rejects = _validate(str(tmp_path / "standard.jsonl"), tmp_path / "std", llava)
    assert rejects == {0: "IMAGE_NEEDS_CHAT"}
    _, _, rejects = _validate([_row(image=good)], tmp_path / "text-model", None)
    assert rejects == {0: "IMAGE_NEEDS_VISION_MODEL"}
    _, _, rejects = _validate([_row(image=good)], tmp_path / "bytes", llava, max_image_bytes=100)
    assert rejects == {0: "IMAGE_TOO_LARGE"}


def test_truncation_never_cuts_image_tokens(tmp_path, llava):
    good = _png(color_image("red", 1))
    long_text = [{"role": "user", "content": [{"type": "text", "text": "x" * 40}, {"type": "image"},
                                              {"type": "text", "text": "Color?"}]}]
    rows = [_row(image=good), {**_row(image=good), "prompt": long_text}]
    # prompt of row 0: 36 tokens, its image tokens from position 5 on; row 1: 82, image from 45 on
    rep, valid, rejects = _validate(rows, tmp_path / "a", llava, max_length=30)
    assert rejects == {0: "IMAGE_TOKENS_TRUNCATED", 1: "IMAGE_TOKENS_TRUNCATED"}
    # keep_end may drop text before the image, never the image's tokens or markers
    rep, valid, rejects = _validate(rows, tmp_path / "b", llava, max_length=60, truncation_mode="keep_end")
    assert rejects == {1: "IMAGE_TOKENS_TRUNCATED"}
    rep, valid, rejects = _validate(rows, tmp_path / "c", llava, max_length=76, truncation_mode="keep_end")
    assert not rejects and rep["truncated"]["rows"] == 1
    ids = valid["prompt_input_ids"].iloc[1].tolist()
    assert ids.count(llava.image_token_id) == 4 and len(ids) < 82


def test_parquet_image_structs_and_relative_paths(tmp_path, llava):
    rows = color_rows(tmp_path / "data", 3)
    write_jsonl(tmp_path / "data" / "train.jsonl", rows)  # relative paths: from the file's folder
    rep, valid, _ = _validate(str(tmp_path / "data" / "train.jsonl"), tmp_path / "jsonl", llava)
    assert rep["valid"] == 3
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    parts = lambda text: [{"type": "text", "text": text}]  # noqa: E731  (as TRL's vision sets store them)
    table = pa.table({"prompt": [[{"role": "user", "content": [{"type": "image", "text": None},
                                                                {"type": "text", "text": "What color is the square?"}]}]
                                 for _ in rows],
                      "chosen": [[{"role": "assistant", "content": parts(r["chosen"][0]["content"])}] for r in rows],
                      "rejected": [[{"role": "assistant", "content": parts(r["rejected"][0]["content"])}] for r in rows],
                      "image": pa.array([{"bytes": (tmp_path / "data" / r["image"]).read_bytes(), "path": "x.png"}
                                         for r in rows], type=struct)})
    pq.write_table(table, tmp_path / "hf.parquet")
    rep2, valid2, rejects = _validate(str(tmp_path / "hf.parquet"), tmp_path / "pq", llava)
    assert rep2["valid"] == 3, rejects
    same = lambda v: [json.loads(x)[0]["sha256"] for x in v["images"]]  # noqa: E731
    assert same(valid2) == same(valid)  # the same image bytes, whichever way they came


def test_an_image_url_is_refused_with_what_to_do(tmp_path):
    from data_contracts.examples import RowError
    from data_contracts.images import ImageStore

    with pytest.raises(RowError, match="is a URL: download the images") as e:
        ImageStore(tmp_path)._read_path("https://picsum.photos/200/300", "images")
    assert e.value.code == "IMAGE_MISSING"
