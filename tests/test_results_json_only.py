"""Prefect result records are JSON only (issue 16): written as JSON by default, and a record that
names pickle (or a JSON record that would rebuild an arbitrary class) is refused on read without
running anything; the state home is created owner-only."""

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
from prefect.serializers import JSONSerializer, PickleSerializer

import tasks  # noqa: F401  (installs the JSON-only reader)
from data_contracts.config import load_config
from tasks.results import UnsafeResultError

MARK = Path("/tmp") / f"dpo-pickle-ran-{os.getpid()}"


class Planted:
    """What an attacker with write access to the result storage would plant."""

    def __reduce__(self):
        return (MARK.write_text, ("ran",))


def _record(serializer, value) -> bytes:
    return ResultRecord(metadata=ResultRecordMetadata(serializer=serializer, storage_key="r1"),
                        result=value).serialize()


def test_a_pickle_record_is_refused_without_running_it():
    with pytest.raises(UnsafeResultError, match="serialized with 'pickle'"):
        ResultRecord.deserialize(_record(PickleSerializer(), Planted()))
    with pytest.raises(UnsafeResultError, match="pickle"):
        ResultRecord.deserialize_from_result_and_metadata(
            PickleSerializer().dumps(Planted()),
            ResultRecordMetadata(serializer=PickleSerializer(), storage_key="r1").dump_bytes())
    assert not MARK.exists()


def test_a_json_record_naming_another_class_or_decoder_is_refused():
    rec = _record(JSONSerializer(), {"x": 1}).replace(b'"result":"{\\"x\\": 1}"',
                                                      b'"result":"{\\"__class__\\": \\"subprocess.Popen\\", '
                                                      b'\\"data\\": [\\"true\\"]}"')
    with pytest.raises(UnsafeResultError, match="subprocess.Popen"):
        ResultRecord.deserialize(rec)
    # the record's own object_decoder / jsonlib settings are not used to read it
    evil = JSONSerializer.model_construct(type="json", jsonlib="json", object_decoder="os.system",
                                          object_encoder=None, dumps_kwargs={}, loads_kwargs={})
    assert ResultRecord.deserialize(_record(evil, {"a": [1, 2]})).result == {"a": [1, 2]}


def test_what_the_pipeline_persists_round_trips():
    value = {"cfg": load_config(), "board": Path("/tmp/board"), "n": 3, "error": ValueError("boom")}
    back = ResultRecord.deserialize(_record(JSONSerializer(), value)).result
    assert back["cfg"] == value["cfg"] and back["board"] == Path("/tmp/board") and back["n"] == 3
    assert isinstance(back["error"], ValueError)


def test_default_serializer_is_json_and_state_home_is_owner_only(tmp_path):
    home = tmp_path / "fresh" / "home"
    code = ("import tasks; from prefect.settings import get_current_settings; "
            "print(get_current_settings().results.default_serializer)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
                              "DPO_HOME": str(home)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "json"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700


def test_every_persisted_task_writes_json():
    from flows.sweep import remote_variant_task
    from tasks import stages

    assert remote_variant_task.result_serializer.type == "json"
    for name in ("validate", "precompute", "train", "evaluate", "register"):
        assert getattr(stages, name).result_serializer == "json", name
