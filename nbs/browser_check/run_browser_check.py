"""Run the walk-through notebook in a real JupyterLab + headless Chromium and check that the training dashboard renders.

One command (from the repository root), with the Python of the environment to check (JupyterLab 4 + ipywidgets 8, or
JupyterLab 3.6 + ipywidgets 7.7; see README.md for both environments):

    VENV/bin/python nbs/browser_check/run_browser_check.py [--out /tmp/lbft/browser/jl4-ipywidgets8/dashboard.png]

Prerequisites (this script installs nothing):

    apt-get install -y chromium            # Debian's browser, used as /usr/bin/chromium
    VENV/bin/pip install jupyterlab playwright   # plus the library and ipywidgets
    # never `playwright install`: no browser download is needed or wanted

What it does: copies the tutorial to a temporary folder (dropping the `#| eval: false` cells, as nbdev_test does),
starts JupyterLab on 127.0.0.1 with a random token on a free port, opens the notebook in headless Chromium driven by
Playwright, starts all cells (not awaiting them), watches the live dashboard while training runs, waits for the
notebook to finish, and asserts that the dashboard rendered: the live header showed the step and a loss on one line,
the final dashboard picture is a real, sharp PNG both in the page after the run and in the saved notebook (where no
widget reference is left in its place), and the summary shows the final step (N/N) and the final loss.
Saves screenshots of the live and final dashboard, prints the asserted figures, and exits non-zero on any failure.
Not part of CI (minutes on a CPU).
"""
import argparse, base64, json, os, re, secrets, shutil, socket, subprocess, sys, tempfile, time, urllib.request
from importlib.metadata import version, PackageNotFoundError
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO/"nbs"/"tutorials"/"complaints_walkthrough.ipynb"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
STEP_RE = re.compile(r"step\s(\d+)/(\d+)")
LOSS_RE = re.compile(r"loss\s(\d+\.\d+)")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
WIDTH = 1000  # the browser window: "a 1000-px-wide notebook"


def versions() -> dict:
    "The versions of the front-end stack under test."
    def v(name):
        try: return version(name)
        except PackageNotFoundError: return None
    return {n: v(n) for n in ("jupyterlab", "ipywidgets", "jupyterlab_widgets", "ipykernel", "transformers")}


def stack_name(v:dict) -> str:
    "A short name of the stack, e.g. `jl4-ipywidgets8`."
    major = lambda s: (s or "0").split(".")[0]
    return f"jl{major(v['jupyterlab'])}-ipywidgets{major(v['ipywidgets'])}"


def png_size(png:bytes) -> tuple:
    "(width, height) of PNG bytes, read from the IHDR chunk."
    check(png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG")
    return int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")


class CheckFailed(Exception): pass


def check(cond, msg):
    "Raise `CheckFailed(msg)` unless `cond`; `msg` may be a callable, called only on failure."
    if not cond: raise CheckFailed(msg() if callable(msg) else msg)


def prerequisites():
    "Fail early, with the command to run, when chromium, jupyterlab or playwright is missing."
    missing = []
    if not Path(CHROMIUM).exists(): missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    for mod in ("jupyterlab", "playwright", "ipywidgets"):
        try: __import__(mod)
        except ImportError: missing.append(f"python package {mod} ({sys.executable} -m pip install {mod})")
    check(not missing, "missing prerequisites: " + "; ".join(missing))


def free_port() -> int:
    "A TCP port nobody listens on right now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def copy_notebook(src:Path, dest:Path) -> int:
    "Copy `src` to `dest` without its `#| eval: false` cells and outputs, with the python3 kernel; returns the code cells."
    nb = json.loads(src.read_text())
    keep = []
    for c in nb["cells"]:
        text = "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        if c["cell_type"] == "code" and re.search(r"^#\|\s*eval:\s*false", text, re.M): continue
        if c["cell_type"] == "code": c["outputs"], c["execution_count"] = [], None
        keep.append(c)
    nb["cells"] = keep
    nb.setdefault("metadata", {})["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    dest.write_text(json.dumps(nb, indent=1))
    return sum(c["cell_type"] == "code" for c in keep)


def start_lab(root:Path, port:int, token:str, log):
    "Start JupyterLab on loopback (no browser, no news/update checks, windowing off so every cell is in the DOM)."
    settings = root/".lab-settings"/"@jupyterlab"/"notebook-extension"
    settings.mkdir(parents=True)
    (settings/"tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    ann = root/".lab-settings"/"@jupyterlab"/"apputils-extension"
    ann.mkdir(parents=True)
    (ann/"notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
           f"--LabApp.user_settings_dir={root/'.lab-settings'}", f"--LabApp.workspaces_dir={root/'.lab-workspaces'}",
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0: cmd.append("--allow-root")  # containers often run as root
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root/".jupyter"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    for _ in range(120):
        check(proc.poll() is None, f"JupyterLab exited early (code {proc.returncode}); see its log")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return proc
        except OSError: time.sleep(0.5)
    raise CheckFailed("JupyterLab did not answer on 127.0.0.1 within 60 s")


def dashboard_state(page) -> dict:
    "What the page shows of the dashboard right now: live header and image, final PNG and summary."
    return page.evaluate(r"""() => {
      const norm = t => t.replace(/\s+/g, ' ').trim();
      const cells = [...document.querySelectorAll('.jp-Notebook .jp-Cell')];
      const dashCell = cells.findIndex(c => c.querySelector('.jp-OutputArea .widget-vbox .widget-image') || /Training summary/.test(c.textContent));
      const out = {dashCell, header: null, live_imgs: [], final_imgs: [], summary: null, ncells: cells.length};
      if (dashCell < 0) return out;
      const c = cells[dashCell];
      c.scrollIntoView({block: 'start'});  // keep the dashboard on screen (rendered, and ready for a screenshot)
      const box = c.querySelector('.jp-OutputArea .widget-vbox');  // the live widget: header + image + gauges
      if (box) {
        const h = [...box.querySelectorAll('.widget-html')].find(e => /step \d+\/\d+/.test(e.textContent));
        out.header = h ? norm(h.textContent) : null;
        if (h) {  // how many lines the header's text takes: its text boxes' tops, more than half a line apart
          const tops = [], rights = [], tw = document.createTreeWalker(h, NodeFilter.SHOW_TEXT);
          while (tw.nextNode()) {
            if (!tw.currentNode.textContent.trim()) continue;
            const r = document.createRange(); r.selectNodeContents(tw.currentNode);
            for (const b of r.getClientRects()) if (b.width > 0) { tops.push(b.top); rights.push(b.right); }
          }
          tops.sort((a, b) => a - b);
          out.header_lines = tops.filter((t, i) => i === 0 || t - tops[i - 1] > 8).length;
          // and how far its text reaches past the output area's right edge (negative: room to spare)
          out.header_overflow = Math.round(Math.max(...rights) - c.querySelector('.jp-OutputArea').getBoundingClientRect().right);
        }
        out.live_imgs = [...box.querySelectorAll('img')].map(i => ({w: i.naturalWidth, h: i.naturalHeight, src: i.src}));  // a new blob: URL per redraw
      }
      out.final_imgs = [...c.querySelectorAll('.jp-OutputArea .jp-RenderedImage img')]
        .map(i => ({w: i.naturalWidth, h: i.naturalHeight, shown_w: Math.round(i.getBoundingClientRect().width),
                    png: i.src.startsWith('data:image/png')}));
      out.output_width = Math.round(c.querySelector('.jp-OutputArea').getBoundingClientRect().width);
      const s = [...c.querySelectorAll('.jp-OutputArea div')].find(d => /^Training summary/.test(d.textContent.trim()));
      out.summary = s ? norm(s.textContent) : null;
      return out;
    }""")


def start_all_cells(page):
    "Start `run all cells` WITHOUT awaiting it; `window.__lbft_done` is set when every cell has run (or one failed)."
    # commands.execute returns a Promise that settles only when the last cell finishes: returning it to
    # page.evaluate would block here until training is over, and the live widget would never be seen.
    page.evaluate("""() => { window.__lbft_done = null;
      window.jupyterapp.commands.execute('notebook:run-all-cells').then(
        ok => { window.__lbft_done = {ok: ok !== false}; }, e => { window.__lbft_done = {ok: false, error: String(e)}; }); }""")


def run(args, figures:dict) -> dict:
    prerequisites()
    from playwright.sync_api import sync_playwright, Error as PlaywrightError
    root = Path(tempfile.mkdtemp(prefix="lbft-browser-"))
    name = "walkthrough.ipynb"
    n_code = copy_notebook(Path(args.notebook), root/name)
    port, token = free_port(), secrets.token_hex(16)
    stack = versions()
    out = Path(args.out or f"/tmp/lbft/browser/{stack_name(stack)}/dashboard.png"); out.parent.mkdir(parents=True, exist_ok=True)
    live_png = out.with_name(out.stem + "_live" + out.suffix)
    log = open(root/"jupyterlab.log", "w")
    proc = start_lab(root, port, token, log)
    figures.update(stack=stack_name(stack), versions=stack, notebook=str(args.notebook), code_cells=n_code, port=port,
                   window_width=WIDTH)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": WIDTH, "height": 2400})  # windowing is off: every cell stays in the DOM
            page.goto(f"http://127.0.0.1:{port}/lab/tree/{name}?token={token}", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                                   "window.jupyterapp.shell.currentWidget.sessionContext && "
                                   "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                                   "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel", timeout=120_000)
            page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'", timeout=120_000)
            page.evaluate("() => window.jupyterapp.shell.collapseLeft()")  # the notebook gets the whole window width
            page.wait_for_timeout(500)
            figures["notebook_width"] = page.evaluate("() => Math.round(document.querySelector('.jp-Notebook').getBoundingClientRect().width)")
            figures["windowing_mode"] = page.evaluate("() => { const nb = window.jupyterapp.shell.currentWidget.content;"
                "nb.notebookConfig = {...nb.notebookConfig, windowingMode: 'none'}; return nb.notebookConfig.windowingMode; }")
            t0 = time.time()
            start_all_cells(page)
            # (1) while the notebook runs: record every distinct live header, the live image, one live screenshot
            headers, live_imgs, shot_step, done, deadline, header_lines = [], [], None, None, t0 + args.timeout, {}
            while time.time() < deadline:
                s = dashboard_state(page)
                if s["header"] and (not headers or headers[-1] != s["header"]):
                    headers.append(s["header"])
                    header_lines[s["header"]] = (s.get("header_lines"), s.get("header_overflow"))
                drawn = [i for i in s["live_imgs"] if i["w"] > 200]
                live_imgs += drawn[:1]
                m = STEP_RE.search(s["header"] or "")
                # screenshot the live widget once its plot is drawn, and again once past half-way (at most twice)
                if m and drawn and (shot_step is None or (shot_step < int(m[2]) // 2 <= int(m[1]))):
                    try:
                        page.locator(".jp-Notebook .jp-Cell").nth(s["dashCell"]).locator(".jp-OutputArea").screenshot(path=str(live_png), timeout=10_000)
                        shot_step, figures["live_screenshot_header"] = int(m[1]), s["header"]
                    except PlaywrightError: pass  # the widget was replaced mid-screenshot (training ended): keep the earlier one
                done = page.evaluate("() => window.__lbft_done")
                if done is not None: break
                time.sleep(0.25)
            else: raise CheckFailed(f"the notebook did not finish within {args.timeout} s (last header: {headers[-1] if headers else None})")
            figures["notebook_seconds"] = round(time.time() - t0, 1)
            saved_before = (root/name).stat().st_mtime
            page.wait_for_function("() => window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status === 'idle'", timeout=60_000)
            page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")  # awaited: the file is written
            check((root/name).stat().st_mtime > saved_before, "JupyterLab did not save the notebook")
            # (2) after the run: the static PNG and the summary that replaced the live widget
            page.wait_for_timeout(1000)
            s = dashboard_state(page)
            if s["dashCell"] >= 0:
                page.locator(".jp-Notebook .jp-Cell").nth(s["dashCell"]).locator(".jp-OutputArea").screenshot(path=str(out))
            else: page.screenshot(path=str(out), full_page=True)
            browser.close()
        nb = json.loads((root/name).read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        errors = [(i, o) for i, c in enumerate(code) for o in c.get("outputs", []) if o.get("output_type") == "error"]
        ran = sum(c.get("execution_count") is not None for c in code)
        dash_i = next((i for i, c in enumerate(code) if any("Training summary" in "".join(o.get("data", {}).get("text/html", ""))
                                                             for o in c.get("outputs", []))), len(code))
        figures.update(cells_executed=f"{ran}/{n_code}", errors=len(errors))
        def cell_errors(early:bool):
            "Fail on the first error in a cell up to the dashboard's (`early`) or after it."
            errs = [(i, o) for i, o in errors if (i <= dash_i) == early]
            check(not errs, f"code cell {errs[0][0] + 1} raised {errs[0][1]['ename']}: {errs[0][1]['evalue'][:300]}" if errs else "")
        cell_errors(early=True)  # an error up to the training cell explains any dashboard failure: report it first
        check(s["dashCell"] >= 0, "no cell shows the dashboard (neither the live widget nor the training summary)")
        # the live dashboard, seen while training ran
        steps = [(int(m[1]), int(m[2])) for h in headers if (m := STEP_RE.search(h))]
        losses = [float(m[1]) for h in headers if (m := LOSS_RE.search(h))]
        check(steps, "the live dashboard header (\"step k/N\") never appeared while the notebook ran")
        total = steps[-1][1]
        figures.update(live_header_updates=len(headers), live_first_header=headers[0], live_last_header=headers[-1],
                       live_steps_seen=f"{min(k for k, _ in steps)}..{max(k for k, _ in steps)} of {total}")
        check(losses, "the live header never showed a loss")
        wrapped = {h: l for h, l in header_lines.items() if l[0] and l[0] > 1}
        cut = {h: l for h, l in header_lines.items() if l[1] is not None and l[1] > 0}
        figures.update(live_header_lines=f"max {max((l[0] or 0) for l in header_lines.values())} over {len(header_lines)} headers",
                       live_header_room=f"{-max(l[1] for l in header_lines.values() if l[1] is not None)} px to spare on the right at the widest")
        check(not wrapped, lambda: f"the live header wrapped onto {max(l[0] for l in wrapped.values())} lines in a {WIDTH}-px notebook: {next(iter(wrapped))!r}")
        check(not cut, lambda: f"the live header runs {max(l[1] for l in cut.values())} px past the output area: {next(iter(cut))!r}")
        figures.update(live_losses_seen=f"{losses[0]} .. {losses[-1]} ({len(losses)} updates with a loss)")
        check(live_imgs, "the live dashboard image never showed a plot (no <img> wider than 200 px in the widget)")
        figures.update(live_image_natural_size=f"{live_imgs[-1]['w']}x{live_imgs[-1]['h']}",
                       live_plot_redraws_seen=len({i['src'] for i in live_imgs}), live_screenshot=str(live_png))
        # the final dashboard: the static PNG and the summary that replaced the widget
        check(s["header"] is None, f"the live widget is still shown after the run ({s['header']!r}); it should be replaced by the PNG")
        pngs = [i for i in s["final_imgs"] if i["png"]]
        check(pngs, f"the dashboard left no PNG image (images seen: {s['final_imgs']})")
        w, h = max((i["w"], i["h"]) for i in pngs)
        figures.update(final_image_natural_size=f"{w}x{h}")
        check(w > 200 and h > 100, f"the final dashboard image is only {w}x{h} px")
        shown = max(i["shown_w"] for i in pngs)
        figures.update(final_image_shown_width=f"{shown} px in a {s['output_width']}-px output area")
        check(w >= 1.4 * shown, f"the final picture is not sharp: {w} px of PNG shown {shown} px wide")
        check(shown <= s["output_width"], f"the final picture ({shown} px) is wider than its output area ({s['output_width']} px)")
        # the saved notebook: the dashboard cell holds the picture itself, not a reference to a widget that is gone
        outs = code[dash_i]["outputs"] if dash_i < len(code) else []
        saved_pngs = [o for o in outs if "image/png" in o.get("data", {})]
        check(saved_pngs, f"the saved notebook has no image/png in the dashboard cell (outputs: {[sorted(o.get('data', {})) for o in outs]})")
        sw, sh = png_size(base64.b64decode(saved_pngs[0]["data"]["image/png"]))
        figures.update(saved_image_size=f"{sw}x{sh}", saved_image_metadata=saved_pngs[0].get("metadata"))
        check((sw, sh) == (w, h), f"the saved picture ({sw}x{sh}) is not the one shown ({w}x{h})")
        dead = [o for o in outs if WIDGET_MIME in o.get("data", {})]
        check(not dead, lambda: f"the saved dashboard cell still holds a widget reference: {dead[0]['data'].get('text/plain')!r}")
        dead_elsewhere = [i + 1 for i, c in enumerate(code) for o in c.get("outputs", []) if WIDGET_MIME in o.get("data", {})]
        figures.update(widget_outputs_left_in_other_cells=f"code cells {dead_elsewhere}" if dead_elsewhere else "none")
        summ = s["summary"] or ""
        m, l = re.search(r"steps\s*(\d+)/(\d+)", summ), re.search(r"train loss\s*(\d+\.\d+)", summ)
        check(m and l, f"the summary lacks the final step or loss: {summ!r}")
        check(m[1] == m[2] and int(m[2]) == total, f"the summary shows step {m[1]}/{m[2]}, not the final step {total}/{total}")
        figures.update(final_step=f"{m[1]}/{m[2]}", final_train_loss=float(l[1]), screenshot=str(out))
        loss_meaning = re.search(r"train loss\s*\d+\.\d+\s*\(([^)]*)\)", summ)
        check(loss_meaning, f"the summary's train loss does not say what it is: {summ!r}")
        figures.update(final_train_loss_meaning=loss_meaning[1])
        check(out.stat().st_size > 10_000, f"the screenshot {out} is suspiciously small")
        cell_errors(early=False)  # the dashboard passed; a later cell (evaluation, ...) may still have failed
        check(ran == n_code and done.get("ok"), f"only {ran} of {n_code} code cells ran ({done})")
        return figures
    finally:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired: proc.kill()
        log.close()
        if args.keep: print(f"kept {root}")
        else: shutil.rmtree(root, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--notebook", default=str(NOTEBOOK), help="notebook to run (default: the walk-through tutorial)")
    p.add_argument("--out", default=None, help="screenshot of the final dashboard (PNG), default /tmp/lbft/browser/STACK/dashboard.png "
                   "(STACK e.g. jl4-ipywidgets8); the live one goes next to it as *_live.png")
    p.add_argument("--timeout", type=int, default=1200, help="seconds to wait for the notebook to finish")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder (notebook with outputs, JupyterLab log)")
    args = p.parse_args(argv)
    figures = {}
    try: run(args, figures)
    except CheckFailed as e:
        print(f"BROWSER CHECK FAILED: {e}", file=sys.stderr)
        for k, v in figures.items(): print(f"  {k}: {v}", file=sys.stderr)  # what was checked before the failure
        return 1
    print("BROWSER CHECK PASSED")
    for k, v in figures.items(): print(f"  {k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
