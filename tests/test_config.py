"""Experiment configs: clear errors that name the key; overrides of nested keys."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from hybrid_twin.config import ConfigError, load_config, resolved
from hybrid_twin.data import pseudonymise_id
from hybrid_twin.errors import InputError
from hybrid_twin.models import get_model
from training.run import build_cohort

REPO = Path(__file__).resolve().parents[1]


def test_shipped_configs_load():
    for path in ("configs/quickstart.yaml", "configs/theophylline.yaml"):
        cfg = load_config(path)
        assert cfg.name


def test_unknown_key_suggests_the_nearest():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.virtual.nn'; did you mean "
                                          r"'data.virtual.n'\?"):
        load_config("configs/quickstart.yaml", ["data.virtual.nn=5"])
    with pytest.raises(ConfigError, match=r"unknown config key 'evalution'; did you mean "
                                          r"'evaluation'\?"):
        load_config(data={"evalution": {}})


def test_wrong_type_and_range_name_the_key():
    with pytest.raises(ConfigError, match=r"data.virtual.n: expected an integer, got 'many'"):
        load_config("configs/quickstart.yaml", ["data.virtual.n=many"])
    with pytest.raises(ConfigError, match=r"data.virtual.n: must be > 0"):
        load_config("configs/quickstart.yaml", ["data.virtual.n=0"])
    with pytest.raises(ConfigError, match=r"error_model.kind: 'gaussian' is not one of"):
        load_config("configs/quickstart.yaml", ["error_model.kind=gaussian"])
    with pytest.raises(ConfigError, match=r"model.free\[1\]: 'p9' is not a parameter"):
        load_config("configs/quickstart.yaml", ["model.free=[p1, p9]"])
    with pytest.raises(ConfigError, match=r"evaluation.metrics\[0\]: 'r2' is not one of"):
        load_config("configs/quickstart.yaml", ["evaluation.metrics=[r2]"])
    with pytest.raises(ConfigError, match=r"split: train \+ val \+ test"):
        load_config("configs/quickstart.yaml", ["split.train=0.9"])


def test_missing_data_file_and_unknown_model():
    with pytest.raises(ConfigError, match=r"data.path: file not found: /\S+/nope.csv"):
        load_config("configs/theophylline.yaml", ["data.path=nope.csv"])
    with pytest.raises(ConfigError, match=r"did you mean 'pkpd.OneCompartment'"):
        load_config("configs/theophylline.yaml", ["model.name=pkpd.OneCompartmnt"])
    with pytest.raises(ConfigError, match=r"config file not found: missing.yaml"):
        load_config("missing.yaml")


def test_set_overrides_nested_keys():
    cfg = load_config("configs/quickstart.yaml",
                      ["data.virtual.noise.additive_sd=2.5", "evaluation.condition_until=600",
                       "output.plots=false"])
    assert cfg.data.virtual.noise.additive_sd == 2.5
    assert cfg.evaluation.condition_until == 600.0
    assert cfg.output.plots is False


def test_learned_terms_and_truth_model_are_checked():
    cfg = load_config("configs/glucose_hybrid.yaml")
    assert cfg.model.learned[0].mode == "scale"
    assert cfg.data.virtual.model == "glucose.BergmanCircadian"
    with pytest.raises(ConfigError, match=r"model.learned\[0\].term: 'insulin_actoin_gain' is not a "
                                          r"term of glucose.BergmanMinimal; did you mean "
                                          r"'insulin_action_gain'\?"):
        load_config("configs/glucose_hybrid.yaml", ["model.learned.0.term=insulin_actoin_gain"])
    with pytest.raises(ConfigError, match=r"model.learned\[0\].mode: 'times' is not one of"):
        load_config("configs/glucose_hybrid.yaml", ["model.learned.0.mode=times"])
    with pytest.raises(ConfigError, match=r"model.learned\[0\].input_states: only a "
                                          r"neural_ode has input states"):
        load_config("configs/glucose_hybrid.yaml", ["model.learned.0.input_states=doses"])
    node = "model.learned=[{kind: neural_ode, input_states: %s}]"
    cfg = load_config("configs/t1d.yaml", [node % "doses"])
    assert cfg.model.learned[0].input_states == "doses"
    with pytest.raises(ConfigError, match=r"input_states\[1\]: 'gut' is not a state of "
                                          r"glucose.HovorkaT1D"):
        load_config("configs/t1d.yaml", [node % "[D1, gut]"])
    with pytest.raises(ConfigError, match=r"input_states: expected a list of states or "
                                          r"'doses', got 'meals'"):
        load_config("configs/t1d.yaml", [node % "meals"])
    with pytest.raises(ConfigError, match=r"input_states: 'doses' is every state of "
                                          r"pkpd.OneCompartment"):
        load_config("configs/theophylline.yaml", [node % "doses"])
    with pytest.raises(ConfigError, match=r"data.virtual.model: pkpd.OneCompartment cannot "
                                          r"generate data for glucose.BergmanMinimal"):
        load_config("configs/glucose_hybrid.yaml", ["data.virtual.model=pkpd.OneCompartment"])
    with pytest.raises(ConfigError, match=r"data.virtual.model: unknown model"):
        load_config("configs/glucose_hybrid.yaml", ["data.virtual.model=glucose.Circadian"])
    node = load_config("configs/glucose_hybrid.yaml", [
        "model.learned=[{kind: neural_ode, out_scale: [1.0, 0.0001, 0.5, 2.0, 0.02]}]"])
    assert node.model.learned[0].out_scale == [1.0, 0.0001, 0.5, 2.0, 0.02]
    with pytest.raises(ConfigError, match=r"model.learned\[1\].kind: a neural_ode replaces"):
        load_config("configs/glucose_hybrid.yaml", [
            "model.learned=[{kind: state_correction, states: [G]}, {kind: neural_ode}]"])


def test_training_section_is_checked():
    """Training needs validation patients and, for the forecast objective, a window cut;
    features and output scales are named or 'auto'."""
    cfg = load_config("configs/glucose_hybrid.yaml", ["training.objective=forecast"])
    assert cfg.model.learned[0].out_scale == 0.3
    assert load_config("configs/glucose_hybrid.yaml").training.objective == "joint"
    with pytest.raises(ConfigError, match=r"split.val: training learned terms "
                                          r"\(model.learned\) needs validation patients"):
        load_config("configs/glucose_hybrid.yaml",
                    ["split={train: 0.75, val: 0.0, test: 0.25, seed: 0}"])
    with pytest.raises(ConfigError, match=r"training.objective: forecast needs "
                                          r"training.condition_until"):
        load_config("configs/glucose_hybrid.yaml", ["training.objective=forecast",
                                                    "evaluation.condition_until=null"])
    with pytest.raises(ConfigError, match=r"training.objective: 'shooting' is not one of"):
        load_config("configs/glucose_hybrid.yaml", ["training.objective=shooting"])
    with pytest.raises(ConfigError, match=r"model.learned\[0\].features\[0\]: "
                                          r"'meal_onboard' is not a feature of "
                                          r"glucose.BergmanMinimal; did you mean "
                                          r"'meal_on_board'\?"):
        load_config("configs/glucose_hybrid.yaml", ["model.learned.0.features=[meal_onboard]"])
    with pytest.raises(ConfigError, match=r"model.learned\[0\].out_scale: expected a number, "
                                          r"a list of numbers or 'auto', got 'automatic'"):
        load_config("configs/glucose_hybrid.yaml", ["model.learned.0.out_scale=automatic"])
    with pytest.raises(ConfigError, match=r"training.lr_decay: expected a number in"):
        load_config("configs/glucose_hybrid.yaml", ["training.lr_decay=1.5"])


def test_covariate_network_section():
    cfg = load_config("configs/theophylline_covariates.yaml")
    assert cfg.model.learned[0].params == ["CL", "V"]
    with pytest.raises(ConfigError, match=r"model.learned\[0\].params\[0\]: 'Cl' is not a "
                                          r"parameter"):
        load_config("configs/theophylline_covariates.yaml",
                    ["model.learned.0.params=[Cl]"])
    with pytest.raises(ConfigError, match="virtual cohorts carry no covariates"):
        load_config("configs/quickstart.yaml", [
            "model.learned=[{kind: covariate_network, params: [p1], covariates: [age]}]"])


def test_solver_section_builds_the_solver_options():
    from hybrid_twin.config import solver_options
    from hybrid_twin.solve import EXPERIMENT_DEFAULT, RK4, Kernel

    cfg = load_config("configs/quickstart.yaml",
                      ["solver.backend=kernel", "solver.method=rk4", "solver.dt0=0.5",
                       "solver.kernel.block=64", "solver.kernel.warps=2",
                       "solver.max_steps=5000", "solver.dtmax=obs"])
    opts = solver_options(cfg)
    assert opts.backend == Kernel(block=64, warps=2)
    assert opts.method == RK4(0.5)
    assert (opts.max_steps, opts.controller.dtmax) == (5000, "obs")
    # the defaults are the library's
    assert solver_options(load_config("configs/quickstart.yaml")) == EXPERIMENT_DEFAULT
    # YAML 1.1 reads 1e-6 as a string; the config takes it as the number it is
    assert solver_options(load_config("configs/quickstart.yaml",
                                      ["solver.rtol=1e-6"])).controller.rtol == 1e-6
    with pytest.raises(ConfigError, match=r"solver.kernel: Kernel.block must be a power of "
                                          r"two, got 100"):
        load_config("configs/quickstart.yaml", ["solver.kernel.block=100"])
    with pytest.raises(ConfigError, match=r"'solver.kernel_block' has moved to "
                                          r"'solver.kernel.block'"):
        load_config("configs/quickstart.yaml", ["solver.kernel_block=64"])
    with pytest.raises(ConfigError, match=r"solver: method 'rk4' needs a step size dt0"):
        load_config("configs/quickstart.yaml", ["solver.backend=kernel", "solver.method=rk4"])
    with pytest.raises(ConfigError, match=r"solver: the diffrax backend runs tsit5, dopri5, "
                                          r"kvaerno5 only, not rk4"):
        load_config("configs/quickstart.yaml", ["solver.backend=diffrax", "solver.method=rk4",
                                                "solver.dt0=1"])
    # hybrid training takes reverse-mode derivatives on every backend, rk4 included
    rk4 = load_config("configs/glucose_hybrid.yaml", ["solver.method=rk4", "solver.dt0=1",
                                                      "solver.backend=kernel"])
    assert solver_options(rk4).method == RK4(1.0)
    assert solver_options(load_config("configs/quickstart.yaml", [
        "solver.precision=float32"])).precision == "float32"
    with pytest.raises(ConfigError, match=r"solver.precision: 'half' is not one of auto, "
                                          r"float32, float64"):
        load_config("configs/quickstart.yaml", ["solver.precision=half"])
    # auto keeps the settings of the backend it picks
    auto = solver_options(load_config("configs/quickstart.yaml", [
        "solver.backend=auto", "solver.diffrax.save_chunk=8"])).resolved()
    assert auto.backend.name == "diffrax" and auto.backend.save_chunk == 8
    with pytest.raises(ConfigError, match=r"solver.backend: 'cuda' is not one of"):
        load_config("configs/quickstart.yaml", ["solver.backend=cuda"])
    with pytest.raises(ConfigError, match=r"'calibration.rtol' has moved to 'solver.rtol'"):
        load_config("configs/quickstart.yaml", ["calibration.rtol=1e-6"])


def test_yaml_floats_and_duplicate_keys(tmp_path):
    """YAML 1.2 floats in files and --set values; a duplicate key names both lines."""
    path = tmp_path / "c.yaml"
    path.write_text("solver: {rtol: 1e-6, atol: 1E-9}\ntraining: {learning_rate: .5}\n"
                    "error_model: {additive: 5.}\ndata: {virtual: {horizon: 1e+3}}\n")
    cfg = load_config(path, ["training.penalty_weight=2e-4"])
    assert (cfg.solver.rtol, cfg.solver.atol) == (1e-6, 1e-9)
    assert (cfg.training.learning_rate, cfg.error_model.additive) == (0.5, 5.0)
    assert (cfg.data.virtual.horizon, cfg.training.penalty_weight) == (1000.0, 2e-4)
    assert load_config(data={"name": "1e3"}).name == "1e3"  # a string stays a string
    path.write_text("name: a\nmodel:\n  name: pkpd.OneCompartment\n"
                    "  name: pkpd.TwoCompartment\n")
    with pytest.raises(ConfigError, match=r"c.yaml:4:3: duplicate key 'name' \(first at line 3, "
                                          r"column 3\)"):
        load_config(path)
    path.write_text("- name: x\n")
    with pytest.raises(ConfigError, match=r"c.yaml: the top level must be a mapping"):
        load_config(path)


def test_paths_resolve_against_the_config_file(tmp_path, monkeypatch):
    """A config's relative data.path is relative to the file; --set and dict paths to the
    current directory; the loaded (and saved) config holds them absolute."""
    monkeypatch.chdir(tmp_path)
    theo = REPO / "hybrid_twin" / "datasets" / "theophylline.csv"
    cfg = load_config(REPO / "configs" / "theophylline.yaml")
    assert Path(cfg.data.path) == theo
    (tmp_path / "data.csv").write_text(theo.read_text())
    over = load_config(REPO / "configs" / "theophylline.yaml", ["data.path=data.csv"])
    assert Path(over.data.path) == tmp_path / "data.csv"
    assert Path(load_config(data={"data": {"source": "csv", "path": "data.csv"}}).data.path) \
        == tmp_path / "data.csv"
    # a run directory's config.yaml reloads from anywhere
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(resolved(cfg), sort_keys=False))
    monkeypatch.chdir(run)
    assert load_config(tmp_path / "run" / "config.yaml") == cfg


def test_values_and_data_section_are_checked(tmp_path):
    for override, message in [
            ("split.seed=-3", r"split.seed: must be >= 0"),
            ("data.virtual.seed=-2", r"data.virtual.seed: must be >= 0"),
            ("solver.rtol=-1e-6", r"solver.rtol: must be > 0, got -1e-06"),
            ("solver.dt0=0.5", r"solver.dt0: only method rk4 takes a fixed step"),
            ("data.time_unit=hours", r"data.time_unit: 'hours' is not one of s, min, h, d or "
                                     r"null"),
            ("data.categorical=drop", r"data.categorical: 'drop' is not one of error, ignore, "
                                      r"one_hot"),
            ("data.max_abs_value=0", r"data.max_abs_value: must be > 0, got 0.0"),
            ("data.max_abs_value=.inf", r"data.max_abs_value: must be finite, got inf"),
            ("error_model={kind: combined, proportional: -0.1}",
             r"error_model.proportional: must be a finite number > 0 for kind 'combined' "
             r"\(the starting value"),
            ("error_model={kind: proportional, additive: 0, estimate: false}", None)]:
        if message is None:  # the proportional kind does not use the additive SD
            assert load_config("configs/quickstart.yaml", [override]).error_model.additive == 0
            continue
        with pytest.raises(ConfigError, match=message):
            load_config("configs/quickstart.yaml", [override])
    cfg = load_config("configs/quickstart.yaml")
    assert cfg.calibration.max_iter == 100
    assert (cfg.data.time_unit, cfg.data.ignore_columns, cfg.data.categorical) == \
        (None, [], "error")
    assert (cfg.data.pseudonymise, cfg.data.pseudonym_key_env) == \
        (False, "HYBRID_TWIN_PSEUDONYM_KEY")
    h5 = tmp_path / "cohort.h5"
    h5.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(64))
    with pytest.raises(ConfigError, match=r"is an HDF5 file, not a CSV event table \(set "
                                          r"data.source: hdf5\)"):
        load_config("configs/theophylline.yaml", [f"data.path={h5}"])
    assert load_config("configs/theophylline.yaml",
                       ["data.source=hdf5", f"data.path={h5}"]).data.path == str(h5)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"is empty; expected an HDF5 cohort file"):
        load_config("configs/theophylline.yaml", ["data.source=hdf5", f"data.path={empty}"])


def test_pseudonymisation_keys(tmp_path, monkeypatch):
    theo = "configs/theophylline.yaml"
    on = "data.pseudonymise=true"
    monkeypatch.delenv("HYBRID_TWIN_PSEUDONYM_KEY", raising=False)
    with pytest.raises(ConfigError, match=r"data.pseudonymise is true but there is no key: "
                                          r"set the environment variable "
                                          r"HYBRID_TWIN_PSEUDONYM_KEY"):
        load_config(theo, [on])
    monkeypatch.setenv("HYBRID_TWIN_PSEUDONYM_KEY", "secret")
    with pytest.raises(ConfigError, match=r"HYBRID_TWIN_PSEUDONYM_KEY holds only 6 bytes"):
        load_config(theo, [on])
    monkeypatch.setenv("HYBRID_TWIN_PSEUDONYM_KEY", "a-secret-of-24-characters")
    assert load_config(theo, [on]).data.pseudonymise
    key = tmp_path / "key.txt"
    key.write_text("another-secret-of-29-characters\n")
    cfg = load_config(theo, [f"data.pseudonym_key_file={key}",
                             f"data.pseudonym_map={tmp_path}/map.csv", on])
    assert cfg.data.pseudonym_key_file == str(key)
    with pytest.raises(ConfigError, match=r"data.pseudonym_key_file: cannot read .*/no "):
        load_config(theo, [f"data.pseudonym_key_file={tmp_path}/no", on])
    with pytest.raises(ConfigError, match=r"data.pseudonym_map: .* lies inside the run "
                                          r"directory"):
        load_config(theo, [f"output.dir={tmp_path}", f"data.pseudonym_map={tmp_path}/map.csv",
                           on])
    # settings that would do nothing without pseudonymise
    for name in ("pseudonym_key_file", "pseudonym_map"):
        with pytest.raises(ConfigError, match=rf"data.{name} is set but data.pseudonymise is "
                                              r"false"):
            load_config(theo, [f"data.{name}={key}"])
    # a relative key file in a config file is relative to that file
    (tmp_path / "c.yaml").write_text("data: {pseudonymise: true, pseudonym_key_file: key.txt}\n")
    assert load_config(tmp_path / "c.yaml").data.pseudonym_key_file == str(key)


def test_device_gpu_needs_a_gpu():
    """The tests run JAX on the CPU only (conftest)."""
    from hybrid_twin.config import check_device

    check_device(load_config("configs/quickstart.yaml", ["device=auto"]))
    check_device(load_config("configs/quickstart.yaml", ["device=cpu"]))
    with pytest.raises(ConfigError, match=r"device: gpu requested but JAX sees only cpu "
                                          r"devices \(install jax\[cuda12\] or set device: "
                                          r"auto/cpu\)"):
        check_device(load_config("configs/quickstart.yaml", ["device=gpu"]))


# --- every data key reaches the importer (config -> training.run.build_cohort) ----------

EVENTS = """ID,TIME,EVID,DV,AMT,CMT,MDV,WT,SEX,SITE
alice,0,1,,100,depot,1,70,F,north
alice,60,0,2.5,,,0,70,F,north
alice,120,0,1.5,,,0,70,F,north
bob,0,1,,100,depot,1,80,M,south
bob,90,0,3.5,,,0,80,M,south
"""
KEY_ENV = "HT_TEST_CONFIG_KEY"
ENV_KEY = "a-key-from-the-environment"
FILE_KEY = "a-key-from-a-file-0123456789"


@pytest.fixture
def study(tmp_path, monkeypatch):
    """`cohort(*overrides, **data_keys)`: the cohort, loaded as a run loads it, of a
    config file study/exp.yaml whose data block holds `data_keys` and the data.path
    data/events.csv (paths relative to the file), read from another directory."""
    root = tmp_path / "study"
    (root / "data").mkdir(parents=True)
    (root / "private").mkdir()
    (root / "data" / "events.csv").write_text(EVENTS)
    (root / "key.txt").write_text(FILE_KEY + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv(KEY_ENV, ENV_KEY)
    monkeypatch.delenv("HYBRID_TWIN_PSEUDONYM_KEY", raising=False)

    def cohort(*overrides, **data_keys):
        data = {"source": "csv", "path": "data/events.csv", **data_keys}
        (root / "exp.yaml").write_text(yaml.safe_dump(
            {"model": {"name": "pkpd.OneCompartment"}, "data": data}))
        cfg = load_config(root / "exp.yaml", list(overrides))
        return build_cohort(cfg, get_model(cfg.model.name), run_dir=tmp_path / "run")[0]

    cohort.root = root
    return cohort


def test_data_keys_change_the_cohort(study):
    def times(c):
        return [float(t) for t, m in zip(c.obs_times[0], c.obs_mask[0]) if m]

    # data.categorical: text covariates are an error (naming the file and the fix) by
    # default, dropped with `ignore`, 0/1 columns with `one_hot`
    with pytest.raises(InputError, match=r"events.csv:2: covariate SEX holds text "
                                         r"\('F', 'M'.*data.ignore_columns: \[SEX\]"):
        study()
    ignored = study("data.categorical=ignore")
    assert ignored.covariate_names == ("WT",) and ignored.ids == ("alice", "bob")
    assert set(study("data.categorical=one_hot").covariate_names) == \
        {"WT", "SEX=F", "SEX=M", "SITE=north", "SITE=south"}
    # data.ignore_columns: named columns are neither standard columns nor covariates
    assert study("data.ignore_columns=[SEX, SITE, WT]").covariate_names == ()
    # data.time_unit: TIME converted to the model's unit (hours)
    assert times(ignored) == [60.0, 120.0]
    assert times(study("data.categorical=ignore", "data.time_unit=min")) == [1.0, 2.0]
    # data.units: DV in ng/mL is the model's mg/L divided by 1000
    np.testing.assert_allclose(
        np.asarray(study("data.categorical=ignore", "data.units={DV: ng/mL}").obs_values),
        np.asarray(ignored.obs_values) / 1000)
    # data.max_abs_value: a larger dose (AMT 100) is an error naming the row and the key
    with pytest.raises(InputError, match=r"events.csv:2: .*data.max_abs_value"):
        study("data.categorical=ignore", "data.max_abs_value=99")
    # data.pseudonymise with the key of data.pseudonym_key_env or data.pseudonym_key_file
    on = ("data.categorical=ignore", "data.pseudonymise=true")
    by_env = study(*on, f"data.pseudonym_key_env={KEY_ENV}")
    assert by_env.ids == tuple(pseudonymise_id(i, ENV_KEY.encode()) for i in ("alice", "bob"))
    by_file = study(*on, pseudonym_key_file="key.txt")
    assert by_file.ids == tuple(pseudonymise_id(i, FILE_KEY.encode())
                                for i in ("alice", "bob"))
    np.testing.assert_array_equal(np.asarray(by_file.obs_values),
                                  np.asarray(ignored.obs_values))
    # data.pseudonym_map: the raw -> pseudonym table, written only on request
    assert not (study.root / "private" / "map.csv").exists()
    study(*on, pseudonym_key_file="key.txt", pseudonym_map="private/map.csv")
    assert (study.root / "private" / "map.csv").read_text().splitlines() == \
        ["RAW_ID,PSEUDONYM", *(f"{i},{p}" for i, p in zip(("alice", "bob"), by_file.ids))]


@pytest.mark.parametrize("override", ["data.categorical=one_hot",
                                      "data.ignore_columns=[SEX]", "data.max_abs_value=5"])
def test_event_table_keys_with_another_source_are_errors(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}: only csv event tables use it, and "
                                          r"data.source is 'virtual'; remove"):
        load_config("configs/quickstart.yaml", [override])
