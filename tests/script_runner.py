"""Run the scripts as a user would (`python grpo.py --flag value`) many times, cheaply, for the fuzz and
bad-input tests (tests/test_fuzz_flags.py, tests/test_bad_input.py).

A fresh `python grpo.py` spends 3-20 s importing torch and transformers before it reads a flag, which
would eat the fuzzer's budget. So a server process imports them once (the third-party modules only:
the scripts and common/ are read from disk by every run), then forks one child per run:
the child chdirs into the run's folder, sends stdout/stderr to files and executes the script as
`__main__` (runpy), with Python's own exit semantics (SystemExit message to stderr, uncaught exception
-> traceback, exit 1). The server kills a child that outlives its timeout (with its process group)
and reports it as a hang. FUZZ_FORK=0 runs each script in a plain `python script.py` subprocess
instead (the slow, most literal way; use it to rule out the fork when a result looks odd).

    runner = get_runner()
    result = runner.run("grpo.py", ["--num-prompts", "0"], cwd="/tmp/x", timeout=120)
    result.returncode, result.stdout, result.stderr, result.timed_out, result.seconds
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("sft.py", "grpo.py", "reinforce.py", "ppo.py", "sft_rl_mixed.py", "dpo.py")
# offline, quiet, one thread: no hub or wandb lookups (a hang there would look like the script's)
ENV = dict(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")


@dataclass
class Result:
    returncode: int  # negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


class Runner:
    def __init__(self):
        self.env = {**os.environ, **ENV, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.scratch = tempfile.mkdtemp(prefix="script_runner_")
        self.server = None
        if os.environ.get("FUZZ_FORK", "1") != "0":
            self.server = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve"], cwd=REPO,
                                           env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert self.server.stdout.readline().strip() == "ready", "the script server did not start"
        self.count = 0

    def run(self, script: str, argv: list[str], cwd: str, timeout: float) -> Result:
        os.makedirs(cwd, exist_ok=True)
        path = os.path.join(REPO, script)
        if self.server is None:
            start = time.perf_counter()
            try:
                out = subprocess.run([sys.executable, path, *argv], cwd=cwd, env=self.env, capture_output=True,
                                     text=True, timeout=timeout)
                return Result(out.returncode, out.stdout, out.stderr, False, time.perf_counter() - start)
            except subprocess.TimeoutExpired as e:
                text = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
                return Result(-9, text(e.stdout), text(e.stderr), True, time.perf_counter() - start)
        self.count += 1
        out, err = (os.path.join(self.scratch, f"{self.count}.{name}") for name in ("out", "err"))
        self.server.stdin.write(json.dumps(dict(path=path, argv=argv, cwd=cwd, timeout=timeout, out=out, err=err))
                                + "\n")
        self.server.stdin.flush()
        reply = json.loads(self.server.stdout.readline())
        with open(out, errors="replace") as f, open(err, errors="replace") as g:
            return Result(reply["returncode"], f.read(), g.read(), reply["timed_out"], reply["seconds"])

    def close(self):
        if self.server is not None and self.server.poll() is None:
            self.server.stdin.close()
            self.server.wait(timeout=30)
        shutil.rmtree(self.scratch, ignore_errors=True)


_runner = None


def get_runner() -> Runner:
    """The session's one runner (started on first use, closed at exit)."""
    global _runner
    if _runner is None:
        _runner = Runner()
        atexit.register(_runner.close)
    return _runner


_sft_model = None


def tiny_sft_model() -> str:
    """A 2-step SFT run of the tiny model (a folder the RL scripts take as --model), built once per
    session; TEST_SFT_RUN=runs/some_sft reuses a finished run instead. Untrained: rewards are mostly 0,
    which is fine for finding crashes, not for testing learning."""
    global _sft_model
    if os.environ.get("TEST_SFT_RUN"):
        return os.path.abspath(os.environ["TEST_SFT_RUN"])
    if _sft_model is None:
        root = tempfile.mkdtemp(prefix="fuzz_sft_")
        atexit.register(shutil.rmtree, root, True)
        out = get_runner().run("sft.py", ["--run-name", "sft", "--total-steps", "2", "--batch-size", "8",
                                          "--micro-batch-size", "8", "--eval-every", "0", "--num-eval-prompts", "2",
                                          "--num-eval-samples", "1", "--no-tensorboard"], cwd=root, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        _sft_model = os.path.join(root, "runs", "sft")
    return _sft_model


# ==== The server: `python tests/script_runner.py --serve`, one JSON request per line on stdin ====


def _child(request: dict):
    """In the forked child: become `python <path> <argv...>` in cwd, then exit as Python would."""
    import runpy
    import traceback

    code = 1
    try:
        os.setsid()  # its own process group: a timeout kills it and anything it started
        os.chdir(request["cwd"])
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(request[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = [request["path"], *request["argv"]]
        try:
            runpy.run_path(request["path"], run_name="__main__")
            code = 0
        except SystemExit as e:  # Python's rules: None -> 0, an int -> itself, anything else printed, 1
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve():
    sys.path.insert(0, REPO)
    import torch

    torch.set_num_threads(1)
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401  (the tiny model's class)

    for script in SCRIPTS:  # their imports, once; a script that does not import fails in its own runs
        try:
            __import__(script.removesuffix(".py"))
        except BaseException:  # noqa: B036
            pass
    # Keep the third-party modules they pulled in, forget this repository's own: each run imports the
    # scripts and common/ afresh from disk (quick), so an edit made while the server runs is seen.
    for name, module in list(sys.modules.items()):
        if os.path.abspath(getattr(module, "__file__", None) or "/").startswith(REPO + os.sep) \
                and "/.venv/" not in (module.__file__ or ""):
            del sys.modules[name]
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _child(request)
        timed_out, status = False, None
        while status is None:
            done, raw = os.waitpid(pid, os.WNOHANG)
            if done:
                status = raw
            elif time.perf_counter() - start > request["timeout"]:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                status = os.waitpid(pid, 0)[1]
            else:
                time.sleep(0.05)
        returncode = os.waitstatus_to_exitcode(status)
        print(json.dumps(dict(returncode=returncode, timed_out=timed_out, seconds=time.perf_counter() - start)),
              flush=True)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
