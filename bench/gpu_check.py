"""The prepared GPU check (issue 10), after set-up: the `gpu` tests, then the training-overhead
benchmark, under one global time guard. Started by bench/gpu_check.sh, which does the set-up
(wheel files brought along, mmcv-lite + the bench shim) and passes its start time and a set-up
note; see bench/README.md "GPU check".

Stages, each printed with its elapsed time, each followed by a rewrite of the summary file:

1. ``python -m pytest <test files holding gpu tests> -m gpu`` (CUDA tests; all skipped on a
   machine without CUDA).
2. ``bench/host_overhead.py`` on the device (``LAYER_RUNS``): one layer's training step through
   every path, side by side (``host_overhead_cuda*.md``).
3. ``bench/train_overhead.py`` once per precision (fp32, then AMP), both models, the plain and
   DO-Conv twins and a DO-Conv twin training all layers through the Function, in one
   process, interleaved ABBA, CUDA-event and wall times, peak memory in fresh processes, one
   profiled step per twin. Each run gets an equal share of the budget left as its deadline, so a
   slow stage shortens the timing (results marked partial) rather than losing everything.

Writes ``gpu_check_<device>.md`` (environment, stages, per-test outcomes, the benchmark summary)
and the benchmark's own ``train_overhead_cuda.md`` / ``train_overhead_cuda_amp.md`` (CPU:
``train_overhead.md`` / ``train_overhead_bf16.md``) into ``--out-dir``. Exit status 0 only when
no test failed and every benchmark run finished without error.
"""
import argparse
import datetime
import glob
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY_TAG = 'TRAIN_OVERHEAD_SUMMARY '  # = bench/train_overhead.py's (no torch import here)

# Settings per device: the real check on a GPU; a tiny rehearsal of the same stages on the CPU.
DEFAULTS = {
    'cuda': dict(budget=450.0, test_budget=150.0, size=512, batch=2, reps=60, warmup=10),
    'cpu': dict(budget=900.0, test_budget=240.0, size=64, batch=2, reps=2, warmup=1),
}
# bench/host_overhead.py runs per device: (label, arguments). On the GPU a layer whose arithmetic
# is negligible (host cost) and one of ResNet's 512-channel 3×3 convs at 64×64, batch 2.
LAYER_RUNS = {
    'cuda': [('4-channel layer, 2×2 input', ['--reps', '10', '--inner', '100']),
             ('512-channel layer, 2×512×64×64 input',
              ['--channels', '512', '--size', '64', '--batch', '2', '--reps', '10',
               '--inner', '10'])],
    'cpu': [('4-channel layer, 2×2 input', ['--reps', '2', '--inner', '5']),
            ('16-channel layer, 2×16×8×8 input',
             ['--channels', '16', '--size', '8', '--batch', '2', '--reps', '2', '--inner', '3'])],
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
    parser.add_argument('--budget', type=float, help='seconds for the whole check, set-up '
                        'included (cuda default 450, cpu 900); stages shrink to fit')
    parser.add_argument('--test-budget', type=float, help='most seconds for the gpu tests')
    parser.add_argument('--out-dir', help='default: $OUT if set, else bench/results (cuda) or '
                        'work_dirs/gpu_check_cpu (cpu)')
    parser.add_argument('--models', nargs='+', default=['pspnet', 'faster_rcnn'])
    parser.add_argument('--precisions', nargs='+', default=['fp32', 'amp'],
                        choices=['fp32', 'amp'])
    parser.add_argument('--size', type=int)
    parser.add_argument('--batch', type=int)
    parser.add_argument('--reps', type=int)
    parser.add_argument('--warmup', type=int)
    parser.add_argument('--mem-reps', type=int, default=1)
    parser.add_argument('--skip-tests', action='store_true')
    parser.add_argument('--t0', type=float, help='start time (time.time()) of the whole check')
    parser.add_argument('--setup-note', default=os.environ.get('GPU_CHECK_SETUP', 'not given'))
    args = parser.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out_dir is None:
        args.out_dir = os.environ.get('OUT') or (
            os.path.join(REPO, 'bench', 'results') if args.device == 'cuda'
            else os.path.join(REPO, 'work_dirs', 'gpu_check_cpu'))
    args.out_dir = os.path.abspath(args.out_dir)
    if args.t0 is None:
        args.t0 = time.time()
    if args.reps < 1 or args.warmup < 0 or args.size < 32 or args.batch < 1:
        parser.error('need --reps >= 1, --warmup >= 0, --size >= 32, --batch >= 1')
    return args


def md_table(header, rows) -> str:
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


def environment(device: str) -> dict:
    """Versions and hardware, read in a subprocess (this process never imports torch)."""
    code = r'''
import json, importlib, importlib.metadata as md, platform
import torch
info = dict(python=platform.python_version(), torch=torch.__version__,
            cuda=torch.version.cuda or 'none', cuda_available=torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=torch.cuda.get_device_name(0), gpu_mem_gib=round(p.total_memory / 2**30, 1),
                capability=f'{p.major}.{p.minor}', cudnn=torch.backends.cudnn.version())
for mod in ('triton', 'torchvision', 'numpy', 'mmengine', 'mmcv', 'mmdet', 'mmseg'):
    try:
        info[mod] = importlib.import_module(mod).__version__
    except Exception as err:
        info[mod] = f'unavailable ({type(err).__name__})'
try:
    import mmcv._ext as ext
    info['mmcv_ops'] = ('mmcv-lite + bench shim' if getattr(ext, 'DO_CONV_MM_SHIM', False)
                        else 'compiled')
except Exception as err:
    info['mmcv_ops'] = f'unavailable ({type(err).__name__})'
print('ENV_JSON ' + json.dumps(info))
'''
    info = {}
    try:
        proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                              timeout=120, cwd=REPO)
        for line in proc.stdout.splitlines():
            if line.startswith('ENV_JSON '):
                info = json.loads(line[len('ENV_JSON '):])
        if not info:
            info['error'] = proc.stderr[-500:]
    except Exception as err:  # noqa: BLE001
        info['error'] = f'{type(err).__name__}: {err}'
    if device == 'cuda':
        try:
            smi = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total',
                                  '--format=csv,noheader'], capture_output=True, text=True,
                                 timeout=30)
            info['nvidia_smi'] = smi.stdout.strip() or smi.stderr.strip()
        except Exception as err:  # noqa: BLE001
            info['nvidia_smi'] = f'unavailable ({type(err).__name__})'
    return info


def run_logged(cmd, timeout: float) -> (int, str):
    """Run ``cmd`` from the repo root in its own process group, echoing its output live; returns
    (exit code, output). At ``timeout`` the whole group is stopped (its memory-probe children
    too) and the exit code is 124."""
    print('$ ' + ' '.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True)
    lines = []

    def pump():
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    killed = False
    try:
        proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        killed = True
        print(f'[gpu_check] time guard: stopping it after {timeout:.0f} s', flush=True)
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(5)
    return (124 if killed else proc.returncode), ''.join(lines)


def junit_results(path: str) -> list:
    """[(test id, outcome, seconds, message)] from pytest's JUnit XML."""
    if not os.path.isfile(path):
        return []
    out = []
    for case in ET.parse(path).getroot().iter('testcase'):
        name = f'{case.get("classname", "")}::{case.get("name", "")}'.replace('tests.', '', 1)
        outcome, message = 'passed', ''
        for tag in ('failure', 'error', 'skipped'):
            node = case.find(tag)
            if node is not None:
                outcome = {'failure': 'failed', 'error': 'error', 'skipped': 'skipped'}[tag]
                message = (node.get('message') or node.text or '').strip().splitlines()
                message = message[0][:200] if message else ''
                break
        out.append((name, outcome, float(case.get('time', 0.0)), message))
    return out


class Check:
    def __init__(self, args):
        self.args = args
        self.stages = []   # [stage, status, seconds]
        self.tests = []
        self.bench = []    # summaries from train_overhead
        self.env = {}
        self.failed = False
        self.path = os.path.join(args.out_dir, f'gpu_check_{args.device}.md')

    def elapsed(self) -> float:
        return time.time() - self.args.t0

    def left(self) -> float:
        return self.args.budget - self.elapsed()

    def stage(self, name: str, status: str, seconds: float) -> None:
        self.stages.append([name, status, f'{seconds:.0f}'])
        print(f'== [{name}] {status} in {seconds:.0f} s (total {self.elapsed():.0f} s of '
              f'{self.args.budget:.0f} s)', flush=True)
        self.write()

    # -------------------------------------------------------------------------------- stages
    def run_tests(self) -> None:
        budget = min(self.args.test_budget, self.left() - 60)
        if self.args.skip_tests or budget < 20:
            self.stage('gpu tests', 'skipped' if self.args.skip_tests else
                       'skipped (time guard)', 0)
            return
        start = time.time()
        # Only the files that hold gpu tests are collected: nothing else can break the stage.
        files = []
        for path in sorted(glob.glob(os.path.join(REPO, 'tests', 'test_*.py'))):
            with open(path) as f:
                if 'mark.gpu' in f.read():
                    files.append(os.path.relpath(path, REPO))
        if not files:
            self.failed = True
            self.stage('gpu tests', 'FAILED: no test file holds gpu tests', 0)
            return
        with tempfile.TemporaryDirectory() as tmp:
            xml = os.path.join(tmp, 'gpu_tests.xml')
            cmd = [sys.executable, '-m', 'pytest', *files, '-m', 'gpu', '-v', '-rs',
                   '-p', 'no:cacheprovider', f'--junitxml={xml}']
            code, _ = run_logged(cmd, budget)
            self.tests = junit_results(xml)
        counts = {}
        for _, outcome, _, _ in self.tests:
            counts[outcome] = counts.get(outcome, 0) + 1
        status = ', '.join(f'{n} {k}' for k, n in sorted(counts.items())) or 'no test ran'
        if code == 124:
            status += ' (stopped by the time guard)'
        # pytest: 0 all passed, 5 nothing collected/selected
        bad = code not in (0, 5) or counts.get('failed') or counts.get('error')
        if self.args.device == 'cuda' and not counts.get('passed'):
            bad = True  # on a GPU the tests must run, not skip
        if bad:
            self.failed = True
            status = f'FAILED (pytest exit {code}): {status}'
        self.stage('gpu tests', status, time.time() - start)

    def run_bench(self, precision: str, runs_left: int) -> None:
        reserve = 10.0  # summary writing
        share = (self.left() - reserve) / runs_left
        name = f'benchmark {precision}'
        if share < 30:
            self.failed = True
            self.stage(name, 'skipped (time guard)', 0)
            return
        start = time.time()
        deadline = time.time() + share - 15  # margin for start-up / writing inside the run
        a = self.args
        cmd = [sys.executable, os.path.join(REPO, 'bench', 'train_overhead.py'),
               '--device', a.device, '--models', *a.models, '--batch', str(a.batch),
               '--size', str(a.size), '--reps', str(a.reps), '--warmup', str(a.warmup),
               '--mem-reps', str(a.mem_reps), '--mem-parallel', '--no-profile', '--op-profile',
               '--function-twin',
               '--deadline', f'{deadline:.0f}', '--out-dir', a.out_dir]
        if precision == 'amp':
            cmd.append('--amp')
        code, output = run_logged(cmd, share)
        summary = None
        for line in output.splitlines():
            if line.startswith(SUMMARY_TAG):
                summary = json.loads(line[len(SUMMARY_TAG):])
        if summary:
            self.bench.append(summary)
        done = len(summary['models']) if summary else 0
        errors = [m['model'] for m in (summary or {}).get('models', []) if m.get('error')]
        partial = [m['model'] for m in (summary or {}).get('models', [])
                   if not m.get('error') and m.get('rounds', 0) < m['reps_requested']]
        status = f'{done - len(errors)}/{len(a.models)} models'
        if partial:
            status += f', partial timing: {", ".join(partial)}'
        if code != 0 or errors or done < len(a.models):
            self.failed = True
            status = f'FAILED (exit {code}{", errors: " + ", ".join(errors) if errors else ""})' \
                     f': {status}'
        self.stage(name, status, time.time() - start)

    def run_layer_costs(self) -> None:
        """bench/host_overhead.py on the device: one layer's training step through every path
        (plain, autograd ops, Function, CPU composer), side by side."""
        budget = min(90.0, self.left() - 240)
        if budget < 20:
            self.stage('layer costs', 'skipped (time guard)', 0)
            return
        start, problems = time.time(), []
        for label, extra in LAYER_RUNS[self.args.device]:
            cmd = [sys.executable, os.path.join(REPO, 'bench', 'host_overhead.py'),
                   '--device', self.args.device, '--out-dir', self.args.out_dir] + extra
            code, _ = run_logged(cmd, budget - (time.time() - start))
            if code != 0:
                problems.append(f'{label}: exit {code}')
        if problems:
            self.failed = True
        self.stage('layer costs', 'FAILED: ' + '; '.join(problems) if problems else
                   f'ok ({len(LAYER_RUNS[self.args.device])} layers)', time.time() - start)

    # -------------------------------------------------------------------------------- report
    def write(self) -> None:
        a, e = self.args, self.env
        gpu = e.get('gpu', 'no GPU')
        title = (f'GPU check (issue 10): {gpu}, torch {e.get("torch", "?")}, CUDA '
                 f'{e.get("cuda", "?")}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}')
        if a.device == 'cpu':
            title = ('GPU check rehearsal on the CPU (tiny settings; CUDA-only parts skipped), '
                     f'{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}')
        env_lines = [
            f'- Date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}',
            f'- Machine: {platform.node()}, {platform.platform()}, {os.cpu_count()} CPUs',
            f'- GPU: {gpu}' + (f', {e["gpu_mem_gib"]} GiB, compute capability '
                               f'{e["capability"]}, cuDNN {e["cudnn"]}' if 'gpu_mem_gib' in e
                               else '') + (f'; nvidia-smi: {e["nvidia_smi"]}'
                                           if 'nvidia_smi' in e else ''),
            f'- Python {e.get("python", "?")}; torch {e.get("torch", "?")} (CUDA '
            f'{e.get("cuda", "?")}); triton {e.get("triton", "?")}; torchvision '
            f'{e.get("torchvision", "?")}; numpy {e.get("numpy", "?")}',
            f'- OpenMMLab: mmengine {e.get("mmengine", "?")}, mmcv {e.get("mmcv", "?")} (ops: '
            f'{e.get("mmcv_ops", "?")}), mmdet {e.get("mmdet", "?")}, mmseg {e.get("mmseg", "?")}',
            f'- Set-up: {a.setup_note}',
            f'- Settings: models {", ".join(a.models)}; precisions {", ".join(a.precisions)}; '
            f'batch {a.batch}, {a.size}×{a.size}; {a.warmup} warm-up + {a.reps} timed rounds; '
            f'time budget {a.budget:.0f} s (set-up included)',
        ]
        if 'error' in e:
            env_lines.append(f'- Environment probe failed: {e["error"]}')
        parts = [
            f'Command: `bash bench/gpu_check.sh --device {a.device}` (then `python '
            f'bench/gpu_check.py`); {self.elapsed():.0f} s so far / in all.',
            '## Environment\n\n' + '\n'.join(env_lines),
            '## Stages\n\n' + md_table(['stage', 'result', 'seconds'], self.stages),
        ]
        if self.tests:
            rows = [[f'`{n}`', o, f'{t:.1f}', m.replace('|', '/')] for n, o, t, m in self.tests
                    if o != 'skipped']
            skipped = {}
            for n, o, t, m in self.tests:
                if o == 'skipped':
                    skipped.setdefault(m, []).append(n)
            rows += [[f'{len(names)} tests, e.g. `{names[0]}`', 'skipped', '',
                      m.replace('|', '/')] for m, names in skipped.items()]
            parts.append('## gpu tests (`python -m pytest <files with gpu tests> -m gpu`)\n\n'
                         + md_table(['test', 'outcome', 's', 'message'], rows))
        if self.bench:
            rows = []
            for run in self.bench:
                for m in run['models']:
                    if m.get('error'):
                        rows.append([m.get('title', m['model']), run['precision'], 'failed', '', '',
                                     '', '', '', '', '', m['error'][:150]])
                        continue

                    def f(key, fmt='{:.3f}'):
                        v = m.get(key)
                        return 'n/a' if v is None or v != v else fmt.format(v)
                    rows.append([
                        m['title'], run['precision'], f'{m["rounds"]}/{m["reps_requested"]}',
                        f('plain ms', '{:.1f}'), f('doconv ms', '{:.1f}'),
                        f('wall-clock delta ms', '{:+.1f}'),
                        f'{f("wall-clock")} ({f("wall-clock iqr")})',
                        f('CUDA events') if 'CUDA events' in m else f('process CPU'),
                        f'{f("wall-clock function")} ({f("function ms", "{:.1f}")} ms)',
                        f('mem peak'), m.get('note', '').replace('|', '/')[:300]])
            files = ', '.join(sorted({os.path.basename(r['file']) for r in self.bench}))
            parts.append(
                '## Training overhead, DO-Conv / plain (medians)\n\n' + md_table(
                    ['model', 'precision', 'rounds', 'plain ms/step', 'DO-Conv ms/step',
                     'Δ ms/step', 'wall ratio (IQR)',
                     'CUDA-event ratio' if a.device == 'cuda' else 'CPU-time ratio',
                     'wall ratio, all layers through the Function', 'peak memory ratio',
                     'note'], rows)
                + f'\n\nDetails (per-round statistics, operator profiles, memory): {files}.')
        os.makedirs(a.out_dir, exist_ok=True)
        text = f'# {title}\n\n' + '\n\n'.join(parts) + '\n'
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            f.write(text)
        os.replace(tmp, self.path)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    check = Check(args)
    print(f'== GPU check on {args.device}: budget {args.budget:.0f} s, {check.elapsed():.0f} s '
          f'spent on set-up; results in {args.out_dir}', flush=True)
    start = time.time()
    check.env = environment(args.device)
    print('environment: ' + json.dumps(check.env), flush=True)
    if args.device == 'cuda' and not check.env.get('cuda_available'):
        check.failed = True
        check.stage('environment', 'FAILED: torch sees no CUDA device', time.time() - start)
        return 1
    check.stage('environment', 'ok', time.time() - start)
    check.run_tests()
    check.run_layer_costs()
    for i, precision in enumerate(args.precisions):
        check.run_bench(precision, len(args.precisions) - i)
    check.stage('all', 'FAILED' if check.failed else 'ok', check.elapsed())
    print(f'wrote {check.path}', flush=True)
    return 1 if check.failed else 0


if __name__ == '__main__':
    sys.exit(main())
