"""Credentials typed into a URL (user:password@) never reach what vltrain writes or prints:
config.yaml (run folder, checkpoints, exports), TensorBoard hparams, log lines and tracebacks,
the converters' errors, the Slurm batch log; a ds_config secret is refused (DeepSpeed stores
its config in every checkpoint)."""
import io
import logging
import os
import subprocess
import sys

import pytest

from vltrain.redact import RedactingFormatter, redact

AWS = "s3://AKIAIOSFODNN7EXAMPLE:wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY@bucket/x"
SECRET = "wJalrXUtnFEMI"


RULES = [
    (AWS, "s3://***@bucket/x"),                                           # a secret with '/'
    ("s3://K:p@ss@b/p", "s3://***@b/p"),                                  # and with '@'
    ("see http://u:p@h/x and s3://K:S@b/y", "see http://***@h/x and s3://***@b/y"),
    (f"run.py data.train={AWS} data.val=s3://bucket/img@0",
     "run.py data.train=s3://***@bucket/x data.val=s3://bucket/img@0"),
    ("http://minio@127.0.0.1:9000/b", "http://***@127.0.0.1:9000/b"),    # a bare user
    ("x=https://ghp_TOKEN@github.com/x y", "x=https://***@github.com/x y"),   # a bare token
    ("ftp://bare@h", "ftp://***@h"),
    ("s3://bucket/vcr/3036_IN_TIME@0.npz", "s3://bucket/vcr/3036_IN_TIME@0.npz"),   # '@' in a path: kept
    ("https://tok@github.com/x@y", "https://tok@github.com/x@y"),        # the last '@' in a path: kept
    ("s3://bucket/x", "s3://bucket/x"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12 next",
     "https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4&X-Amz-Credential=***&X-Amz-Signature=*** next"),
    ("u?x-amz-security-token=FQo&sig=zz#f", "u?x-amz-security-token=***&sig=***#f"),
    ("env AWS_SECRET_ACCESS_KEY=wJal/r AWS_SESSION_TOKEN=FQo HF_TOKEN=hf_x AWS_REGION=us-east-1",
     "env AWS_SECRET_ACCESS_KEY=*** AWS_SESSION_TOKEN=*** HF_TOKEN=*** AWS_REGION=us-east-1"),
    ("SignatureDoesNotMatch: the signature", "SignatureDoesNotMatch: the signature"),
    ("aws_secret_access_key = wJal/r", "aws_secret_access_key = ***"),      # ~/.aws/credentials
    ("{'AWS_SECRET_ACCESS_KEY': 'wJal r', 'x': 1}", "{'AWS_SECRET_ACCESS_KEY': ***, 'x': 1}"),   # a dict's repr
    ('"aws_session_token":"FQo"}', '"aws_session_token":***}'),
    ("MY_HF_TOKEN=hf_x COMET_API_KEY=c WANDB_API_KEY='w x' HF_TOKENIZERS_PARALLELISM=false",
     "MY_HF_TOKEN=*** COMET_API_KEY=*** WANDB_API_KEY=*** HF_TOKENIZERS_PARALLELISM=false"),
    ("HF_TOKEN=", "HF_TOKEN="),                                           # nothing after it: nothing masked
    ("GCS_SECRET=g AZURE_ACCOUNT_ACCESS_KEY=a DATABRICKS_TOKEN=d GCS_KEY=id",
     "GCS_SECRET=*** AZURE_ACCOUNT_ACCESS_KEY=*** DATABRICKS_TOKEN=*** GCS_KEY=id"),
]


@pytest.mark.parametrize("text, want", RULES)
def test_redact_rule(text, want):
    assert redact(text) == want


def test_a_secrets_value_is_looked_for_on_its_own_line():
    """as the templates' sed reads line by line: an empty assignment masks nothing on the next"""
    assert redact("HF_TOKEN=\nPATH=/usr/bin") == "HF_TOKEN=\nPATH=/usr/bin"


def test_the_slurm_templates_redact_by_the_same_rules():
    """slurm/common.sh's vltrain_redact (sed: the batch log echoes the command) against the same cases."""
    lines = "\n".join(text for text, _ in RULES)
    p = subprocess.run(["bash", "-c", 'source slurm/common.sh; vltrain_redact "$1"', "_", lines],
                       capture_output=True, text=True, timeout=60)
    assert p.stdout.rstrip("\n").split("\n") == [want for _, want in RULES], p.stdout + p.stderr


def test_an_object_store_url_with_credentials_is_refused_naming_the_key_or_argument(monkeypatch, capsys):
    """botocore takes "KEY:SECRET@bucket" for a bucket name and quotes it in its errors, where
    no URL rule can find it: refused where it enters, redacted in the refusal."""
    from data_tools import convert_text
    from vltrain.config import ConfigError, load_config
    with pytest.raises(ConfigError, match=r"config key 'data.train': s3://\*\*\*@bucket/x has credentials") as e:
        load_config("configs/debug.yaml", [f"data.train={AWS}"])
    assert SECRET not in str(e.value) and "AWS_SECRET_ACCESS_KEY" in str(e.value)
    assert convert_text.main(["--input", "x.txt", "--out", AWS]) == 2
    err = capsys.readouterr().err
    assert "--out: s3://***@bucket/x has credentials" in err and SECRET not in err
    load_config("configs/debug.yaml", ["data.train=s3://bucket/img@0"])       # an @ in a path is fine
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://minio:SuperSecretPw@127.0.0.1:9000")
    with pytest.raises(ConfigError, match=r"S3_ENDPOINT_URL=http://\*\*\*@127.0.0.1:9000 has credentials"):
        load_config("configs/debug.yaml")
    assert convert_text.main(["--input", "x.txt", "--out", "s3://bucket/x"]) == 2
    assert "SuperSecretPw" not in capsys.readouterr().err
    # without its http:// (botocore quoted it whole as an invalid endpoint)
    monkeypatch.setenv("S3_ENDPOINT_URL", "AKIAURLKEY000001:urlSecret/0@127.0.0.1:9000")
    with pytest.raises(ConfigError, match=r"S3_ENDPOINT_URL=\*\*\*@127.0.0.1:9000 has credentials") as e:
        load_config("configs/debug.yaml")
    assert "urlSecret" not in str(e.value)


def test_saved_config_and_resume_diff_hold_no_credentials(tmp_path):
    """URLs whose user:password@ is read (streaming's sftp://) or not ours to refuse."""
    from vltrain.config import load_config, save_config
    from vltrain.engine.build import warn_config_changes
    over = [f"data.train=sftp://user:{SECRET}@host/x", "train.init_from=http://user:pass@host/w"]
    cfg = load_config("configs/debug.yaml", over)
    save_config(cfg, str(tmp_path / "config.yaml"))
    text = (tmp_path / "config.yaml").read_text()
    assert SECRET not in text and "pass@" not in text and "sftp://***@host/x" in text
    # a resume with the same command line sees no difference (the saved file is redacted)
    assert warn_config_changes(load_config("configs/debug.yaml", over), str(tmp_path)) == []


def test_hparams_drop_token_keys_and_redact_urls():
    from vltrain.monitor import scrub_hparams
    out = scrub_hparams({"data": {"train": AWS, "list": [AWS]},
                         "x": {"session_token": "T", "AWS_SESSION_TOKEN": "T", "tokens": ["T"]},
                         "model": {"pad_token_id": 0, "vlbert_end_token": True, "mask_token_prob": 0.8}})
    assert out["data.train"] == "s3://***@bucket/x" and SECRET not in out["data.list"]
    assert not any(k.startswith("x.") for k in out)          # text under a secret-looking key
    # a number or a flag is no secret: the model's token ids and switches stay in the record
    assert {k: v for k, v in out.items() if k.startswith("model.")} == {
        "model.pad_token_id": 0, "model.vlbert_end_token": True, "model.mask_token_prob": 0.8}


def test_log_lines_and_tracebacks_are_redacted():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(RedactingFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("test_redact")
    log.addHandler(handler)
    try:
        try:
            raise ValueError(f"cannot read {AWS}/vltrain_meta.json")
        except ValueError:
            log.exception("dataset %s", AWS)
    finally:
        log.removeHandler(handler)
    assert SECRET not in stream.getvalue() and "s3://***@bucket/x" in stream.getvalue()
    p = subprocess.run([sys.executable, "-c", "from vltrain.redact import install_excepthook; install_excepthook(); "
                        f"raise RuntimeError('endpoint {AWS}')"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "RuntimeError: endpoint s3://***@bucket/x" in p.stderr and SECRET not in p.stderr


def test_converter_errors_are_redacted(capsys):
    """A converter's unexpected error (botocore's "Could not connect to the endpoint URL: ..."
    with S3_ENDPOINT_URL's user:password@) prints its traceback without them, exit 1."""
    import argparse
    from data_tools.common import run_main

    def fail(args):
        raise ConnectionError('Could not connect to the endpoint URL: "http://minio:SuperSecretPw@127.0.0.1:1/b"')
    assert run_main(fail, argparse.ArgumentParser(), []) == 1
    err = capsys.readouterr().err
    assert "SuperSecretPw" not in err and "http://***@127.0.0.1:1/b" in err


def test_a_ds_config_secret_is_refused():
    from vltrain.config import Config, debug_model_config
    from vltrain.engine.ds_config import DSConfigError, resolve_ds_config
    ds = {"train_micro_batch_size_per_gpu": "auto", "comet": {"enabled": True, "api_key": "COMET_SECRET"}}
    with pytest.raises(DSConfigError, match="'comet.api_key' would be stored in every checkpoint.*COMET_API_KEY"):
        resolve_ds_config(ds, Config(model=debug_model_config()), 1, "cpu")


@pytest.mark.parametrize("override", [f"data.train=[{AWS}]", f"train.max_steps={AWS}", f"data={{train: {AWS}"])
def test_config_errors_quote_values_redacted(override):
    """A ConfigError's message may be printed where no redacting log is (the Slurm templates'
    config check prints it to the batch log): the value it quotes is masked."""
    from vltrain.config import ConfigError, load_config
    with pytest.raises(ConfigError) as e:
        load_config("configs/debug.yaml", [override])
    assert SECRET not in str(e.value) and "s3://***@bucket/x" in str(e.value), str(e.value)


def test_a_mistyped_argument_holding_credentials_is_quoted_redacted(capsys):
    """Where a flag or a key=value override was expected: argparse's "unrecognized arguments"
    (before any logging is set up) and the sbatch templates' refusal quoted it whole."""
    import os
    from data_tools import convert_text
    url = "s3://AKIAEXAMPLE:" + SECRET + "/x@bucket/x"
    p = subprocess.run([sys.executable, "vltrain/run.py", "--config", "configs/debug.yaml", f"--data.train={url}"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "unrecognized arguments: --data.train=s3://***@bucket/x" in p.stderr, p.stderr
    assert SECRET not in p.stdout + p.stderr
    with pytest.raises(SystemExit):
        convert_text.main(["--input", "x.txt", "--out", "o", "--bogus", url])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus s3://***@bucket/x" in err and SECRET not in err, err
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
           "SLURM_JOB_ID": "7", "CONFIG": "configs/debug.yaml", "VLTRAIN_HOME": os.getcwd()}
    p = subprocess.run(["bash", "-c", 'source slurm/common.sh; vltrain_main "$1"', "_", url], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 2 and "argument 's3://***@bucket/x' is not a key=value config override" in p.stderr, p
    assert SECRET not in p.stdout + p.stderr


def test_another_threads_traceback_is_printed_redacted():
    """streaming uploads and downloads in threads of its own: an uncaught exception there was
    printed by threading's hook, unredacted (run.py, the converters install ours)."""
    code = ("from vltrain.redact import install_excepthook; import threading\n"
            "install_excepthook()\n"
            "def fail():\n    raise RuntimeError('upload to %s failed')\n"
            "t = threading.Thread(target=fail, name='uploader'); t.start(); t.join()\n") % AWS
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Exception in thread uploader:" in p.stderr and "upload to s3://***@bucket/x failed" in p.stderr, p.stderr
    assert SECRET not in p.stderr


def test_python_warnings_go_through_the_ranks_log_redacted():
    """A library's warnings.warn went to stderr bare (no job or rank, unredacted): through the
    log's handler now, on each rank (a warning may be that rank's own); DeepSpeed's use of a
    collective torch deprecated is not shown at all."""
    code = ("import warnings\nfrom vltrain.redact import setup_logging\nsetup_logging()\n"
            "warnings.warn('cannot reach %s')\n"
            "warnings.warn('`torch.distributed.all_gather_into_tensor` is deprecated. Use ...', FutureWarning)\n"
            ) % AWS
    out = {}
    for rank in ("0", "1"):
        env = {**os.environ, "RANK": rank, "SLURM_JOB_ID": "77"}
        out[rank] = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                   env=env).stderr
    for rank in ("0", "1"):
        assert f"job=77 rank={rank} WARNING py.warnings:" in out[rank], out
        assert "cannot reach s3://***@bucket/x" in out[rank] and SECRET not in out[rank], out[rank]
        assert "all_gather_into_tensor" not in out[rank], out[rank]
