"""Stage `report`: one self-contained page a person can look at -> reports/index.html.

Read from what the other stages wrote (nothing is recomputed): the summary (data, backbone, head, headline metric
with its interval, parity), every metric of reports/metrics.json, the evaluation pictures (confusion matrix,
calibration, mistakes, PR curves, examples: whatever the task's evaluate drew), the per-class table, the mistakes
as thumbnails, and the audit: label issues (given vs suggested), near-duplicate / leak / conflict pairs side by
side, outliers, class balance and the learning curve with its prediction. Pictures and thumbnails are inlined
(data: URIs), so the page opens from disk, by mail or from a CI artifact, with no server and nothing beside it.
Every text from the data (paths, labels, class names) is HTML-escaped. A part whose input is missing is left out
with a line saying why; the page itself never fails on a missing optional report.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.cli import stage_main
from tasks.config import Params
from tasks.files import write_text
from tasks.layout import Layout, Progress

THUMB = 112  # thumbnail side in pixels
MAX_THUMBS = {"mistakes": 20, "label_issues": 24, "pairs": 16, "outliers": 12}
PICTURE_ORDER = ["confusion.png", "calibration.png", "mistakes.png", "pr.png", "iou.png", "examples.png"]
PAIR_ORDER = {"leak": 0, "conflict": 1, "near_duplicate": 2}  # what a user must see first

CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2329;background:#f6f7f9}
header{background:#1d2933;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#c9d3dc}header a{color:#9fd0ff}main{padding:8px 28px 40px;max-width:1280px}
section{background:#fff;border:1px solid #dde2e7;border-radius:6px;margin:16px 0;padding:12px 18px}
h2{font-size:17px;margin:4px 0 10px}h3{font-size:14px;margin:14px 0 6px}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #e6e9ed;padding:3px 10px;text-align:left}
th{background:#f0f2f5}td.n{text-align:right;font-variant-numeric:tabular-nums}
.kpi{display:flex;flex-wrap:wrap;gap:12px}.kpi div{background:#f0f4f8;border-radius:6px;padding:8px 14px}
.kpi b{display:block;font-size:20px}.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;border:1px solid #e6e9ed;border-radius:4px;padding:4px;background:#fff;font-size:12px}
figure img{display:block}figcaption{max-width:240px;overflow-wrap:anywhere}
.pair{display:flex;gap:4px}.pic{max-width:min(100%,560px);height:auto;border:1px solid #e6e9ed}
.note{color:#5b6670}.bad{color:#b3261e}.good{color:#1e7b34}#broken{display:none;background:#fde7e7;padding:8px 28px}
"""

# A user should know when a picture did not decode (a truncated file, a browser without a codec): the page says so.
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-images', imgs.length + ' ' + broken.length);
  if (broken.length) {
    var b = document.getElementById('broken');
    b.textContent = broken.length + ' of ' + imgs.length + ' pictures on this page did not decode.';
    b.style.display = 'block';
  }
});
"""


@dataclass(frozen=True)
class ReportResult:
    path: Path
    sections: list[str]
    images: int
    seconds: float


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


class Page:
    """The page's parts as HTML strings, and a count of the pictures inlined."""

    def __init__(self):
        self.parts: list[str] = []
        self.names: list[str] = []
        self.images = 0

    def section(self, name: str, title: str, body: str) -> None:
        self.names.append(name)
        self.parts.append(f'<section id="{esc(name)}"><h2>{esc(title)}</h2>{body}</section>')

    def picture(self, path: Path, alt: str) -> str:
        """A PNG/JPEG file inlined as it is (the stages' plots)."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            return f'<p class="note">{esc(path.name)}: not readable ({esc(exc.strerror or exc)})</p>'
        mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
        self.images += 1
        return f'<img class="pic" src="{data_uri(data, mime)}" alt="{esc(alt)}">'

    def thumb(self, path: Path | None, caption: str) -> str:
        """A figure with a JPEG thumbnail of an image of the data set (decoded and shrunk here), or a note."""
        img = None
        if path is not None:
            img = thumbnail(path)
        if img is None:
            inner = f'<div class="note" style="width:{THUMB}px;height:{THUMB}px">not readable</div>'
        else:
            self.images += 1
            inner = f'<img src="{data_uri(img, "image/jpeg")}" alt="{esc(path.name)}" loading="eager">'
        return f"<figure>{inner}<figcaption>{caption}</figcaption></figure>"


def thumbnail(path: Path) -> bytes | None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMB * 2, THUMB * 2))  # JPEG: decode at a reduced scale, much faster
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            if min(im.size) < THUMB // 2:  # tiny images (8x8 digits): scaled up, pixels kept sharp
                scale = THUMB / max(im.size)
                im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.NEAREST)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=82)
            return buf.getvalue()
    except (OSError, UnidentifiedImageError, ValueError):
        return None


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="n">{esc(fmt(v))}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
        else f"<td>{esc(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def read_csv(path: Path) -> tuple[list[str], list[list]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return [], []

    def num(v: str):
        try:
            return int(v)
        except ValueError:
            try:
                return float(v)
            except ValueError:
                return v

    return rows[0], [[num(v) for v in r] for r in rows[1:]]


def load(path: Path):
    """An optional JSON report: None when it is missing or unreadable (the page says the part is absent)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Images:
    """Resolve the paths the reports name (dataset-relative, or relative to the project) to files."""

    def __init__(self, layout: Layout):
        self.layout = layout
        try:
            self.dataset = layout.dataset()
        except Exception:  # noqa: BLE001 - the page is still useful without thumbnails
            self.dataset = None

    def find(self, rel: str) -> Path | None:
        p = Path(rel)
        for cand in ([p] if p.is_absolute() else [self.layout.root / p]) + (
                [self.dataset.root / p] if self.dataset is not None else []):
            if cand.is_file():
                return cand
        return None


def summary_part(page: Page, layout: Layout, params: Params, metrics: dict | None, parity: dict | None,
                 train: dict | None) -> str:
    card = load(layout.card_json) or {}
    dataset = load(layout.prepared / "dataset.json") or {}
    kpis = []
    if metrics:
        for key in ("accuracy", "mAP", "map", "miou", "macro_f1", "ap50", "ece"):
            if isinstance(metrics.get(key), (int, float)):
                ci = metrics.get(f"{key}_ci95")
                ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if isinstance(ci, list) and len(ci) == 2 else ""
                kpis.append(f"<div>{esc(key)}<b>{metrics[key]:.4f}</b>{esc(ci_text)}</div>")
        if metrics.get("n") is not None:
            kpis.append(f"<div>evaluated on<b>{esc(metrics['n'])}</b>{esc(metrics.get('eval_split', ''))} images</div>")
    if parity:
        ok = parity.get("passed")
        kpis.append(f'<div>ONNX parity<b class="{"good" if ok else "bad"}">{"passed" if ok else "FAILED"}</b>'
                    f'{esc(parity.get("n", ""))} images</div>')
    rows = [["task", params.task], ["data", f"{dataset.get('dataset', params.data.dataset)}: "
                                             f"{len(dataset.get('classes', []))} classes, splits {dataset.get('counts', '')}"],
            ["backbone", f"{card.get('arch', params.backbone.name)} (frozen), input {card.get('input_size', '')}"]]
    if train:
        rows.append(["head", ", ".join(f"{k} {fmt(train[k])}" for k in ("solver", "l2", "best_epoch", "class_weights",
                                                                         "seconds") if train.get(k) is not None)])
    if metrics and metrics.get("domain_gap") is not None:
        rows.append(["domain gap", f"{fmt(metrics['domain_gap'])}: {metrics.get('domain_gap_verdict', '')}"])
    body = f'<div class="kpi">{"".join(kpis)}</div>' + table(["about", "this run"], rows)
    page.section("summary", "Summary", body)
    return body


def metrics_part(page: Page, metrics: dict | None) -> None:
    if not metrics:
        page.section("metrics", "Metrics", '<p class="note">reports/metrics.json is missing: run the evaluate stage.</p>')
        return
    rows = []
    for k, v in metrics.items():
        if k.endswith("_ci95") or isinstance(v, (dict, list)):
            continue
        ci = metrics.get(f"{k}_ci95")
        rows.append([k, v, f"[{ci[0]}, {ci[1]}]" if isinstance(ci, list) and len(ci) == 2 else ""])
    page.section("metrics", "Metrics", table(["metric", "value", "95% interval"], rows))


def evaluation_part(page: Page, layout: Layout, images: Images) -> None:
    ev = layout.evaluation
    if not ev.is_dir():
        page.section("evaluation", "Evaluation", '<p class="note">reports/evaluation/ is missing.</p>')
        return
    pngs = sorted(ev.glob("*.png"), key=lambda p: (PICTURE_ORDER.index(p.name) if p.name in PICTURE_ORDER else 99, p.name))
    body = '<div class="grid">' + "".join(
        f"<figure>{page.picture(p, p.stem)}<figcaption>{esc(p.name)}</figcaption></figure>" for p in pngs) + "</div>"
    if (ev / "per_class.csv").is_file():
        header, rows = read_csv(ev / "per_class.csv")
        body += "<h3>Per class</h3>" + table(header, rows)
    mistakes = load(ev / "mistakes.json")
    if isinstance(mistakes, list) and mistakes:
        figs = []
        for m in mistakes[: MAX_THUMBS["mistakes"]]:
            if not isinstance(m, dict) or "path" not in m:
                continue
            words = [f"{k} {fmt(v)}" for k, v in m.items() if k != "path" and not isinstance(v, (dict, list))]
            words += [f"{k} {', '.join(map(str, v))}" for k, v in m.items() if isinstance(v, list)]
            figs.append(page.thumb(images.find(m["path"]), esc(Path(m["path"]).name) + "<br>" + esc("; ".join(words))))
        body += f"<h3>Mistakes (the worst {len(figs)})</h3><div class=\"grid\">{''.join(figs)}</div>"
    page.section("evaluation", "Evaluation", body)


def audit_part(page: Page, layout: Layout, images: Images, audit: dict | None) -> None:
    if not audit:
        page.section("audit", "Audit", '<p class="note">reports/audit.json is missing: run the audit stage.</p>')
        return
    if not audit.get("enabled", True) or "label_issues" not in audit:
        page.section("audit", "Audit", f'<p class="note">{esc(audit.get("reason") or audit.get("skipped") or "skipped")}</p>')
        return
    body = f'<p class="note">{esc(audit.get("head", ""))}</p>'
    li = audit["label_issues"]
    figs = [page.thumb(images.find(i["path"]),
                       f"{esc(i['path'])}<br>given <b>{esc(i['given'])}</b> &rarr; suggested <b>{esc(i['suggested'])}</b>"
                       f"<br>score {esc(fmt(i['score']))} ({esc(i.get('split', ''))})")
            for i in li.get("issues", [])[: MAX_THUMBS["label_issues"]]]
    body += (f"<h3>Label issues: {esc(li.get('count', 0))} found</h3><p class=\"note\">{esc(li.get('method', ''))}; "
             f"all scores in {esc(li.get('listed_in', ''))}</p><div class=\"grid\">{''.join(figs)}</div>")

    du = audit.get("duplicates", {})
    counts = du.get("counts", {})
    pairs = sorted(du.get("pairs", []), key=lambda p: (PAIR_ORDER.get(p.get("kind"), 9), -p.get("similarity", 0)))
    cells = []
    for p in pairs[: MAX_THUMBS["pairs"]]:
        cap = (f"<b>{esc(p['kind'])}</b> {esc(fmt(p['similarity']))}{' (exact copy)' if p.get('exact') else ''}<br>"
               f"{esc(p['split_a'])}/{esc(p['label_a'])} vs {esc(p['split_b'])}/{esc(p['label_b'])}")
        cells.append(f'<figure><div class="pair">{page.thumb(images.find(p["a"]), esc(p["a"]))}'
                     f'{page.thumb(images.find(p["b"]), esc(p["b"]))}</div><figcaption>{cap}</figcaption></figure>')
    effect = du.get("leak_effect")
    effect_text = ""
    if isinstance(effect, dict) and "with_leaks" in effect:
        effect_text = (f"<p>{esc(effect.get('metric', ''))} on {esc(effect.get('split', ''))}: "
                       f"<b>{esc(fmt(effect['with_leaks']))}</b> with the leaked images, <b>{esc(fmt(effect.get('without_leaks')))}</b> "
                       f"without them ({esc(effect.get('removed', 0))} removed; {esc(effect.get('scored_by', ''))})</p>")
    body += (f"<h3>Near-duplicates, leaks and conflicts</h3><p class=\"note\">{esc(du.get('metric', ''))} &ge; "
             f"{esc(du.get('threshold', ''))}: " + esc(", ".join(f"{k} {v}" for k, v in counts.items()))
             + f"; all pairs in {esc(du.get('listed_in', ''))}</p>{effect_text}<div class=\"grid\">{''.join(cells)}</div>")

    ou = audit.get("outliers", {})
    figs = [page.thumb(images.find(o["path"]), f"{esc(o['path'])}<br>{esc(o['label'])}: {esc(fmt(o['score']))}")
            for o in ou.get("items", [])[: MAX_THUMBS["outliers"]]]
    body += (f"<h3>Outliers: {esc(ou.get('count', 0))} unlike their own class</h3><p class=\"note\">{esc(ou.get('method', ''))}"
             f"</p><div class=\"grid\">{''.join(figs)}</div>")

    ba = audit.get("balance", {})
    if ba.get("counts"):
        rows = [[c, n, ba.get("weights", {}).get(c, ""), ba.get("recall", {}).get(c, "")] for c, n in ba["counts"].items()]
        body += (f"<h3>Class balance: imbalance ratio {esc(fmt(ba.get('imbalance_ratio')))}, class_weights "
                 f"{esc(ba.get('class_weights'))}</h3>" + table(["class", "train images", "weight",
                                                                 f"recall ({ba.get('measured_on', '')})"], rows))
    lc = audit.get("learning_curve", {})
    if lc:
        pic = layout.audit_dir / "learning_curve.png"
        pred = "; ".join(f"{p['multiple']}x the data ({p['n']} images): {p['score']:.4f} [{p['low']:.4f}, {p['high']:.4f}]"
                         for p in lc.get("predicted", []))
        body += (f"<h3>How many images: the learning curve ({esc(lc.get('metric', ''))} on {esc(lc.get('scored_on', ''))})"
                 f"</h3>{page.picture(pic, 'learning curve') if pic.is_file() else ''}<p>predicted: {esc(pred)}</p>")
        check = lc.get("check")
        if isinstance(check, dict) and "predicted_full" in check:
            body += (f"<p class=\"note\">check: fitted on {esc(check.get('fit_on'))}, predicted "
                     f"{esc(fmt(check['predicted_full']))} for all of train, measured {esc(fmt(check.get('measured_full')))}</p>")
        if lc.get("gain_most"):
            body += f"<p>would gain most from more labels: {esc(json.dumps(lc['gain_most']))}</p>"
        if lc.get("saturated") is not None:
            body += f"<p>{'flattened: more images of the same kind will not help much' if lc['saturated'] else 'still rising: more images will help'}</p>"
    page.section("audit", "Audit: the data", body)


def select_part(page: Page, layout: Layout) -> None:
    report = load(layout.select_report)
    if isinstance(report, dict) and report.get("candidates"):
        rows = [[c["name"], c.get("probe_acc"), c.get("logme"), c.get("latency_ms_b1"), c.get("gflops")]
                for c in report["candidates"]]
        pic = page.picture(layout.select_plot, "backbone candidates") if layout.select_plot.is_file() else ""
        page.section("select", "Which backbone", f"<p>chosen: <b>{esc(report['choice']['name'])}</b> "
                     f"({esc(report['choice'].get('reason', ''))})</p>"
                     + table(["candidate", "probe accuracy", "LogME", "ms (batch 1)", "GFLOPs"], rows) + pic)


def render(params: Params, layout: Layout) -> tuple[str, Page]:
    page = Page()
    images = Images(layout)
    metrics, parity, train = load(layout.metrics), load(layout.parity), load(layout.reports / "train.json")
    summary_part(page, layout, params, metrics, parity, train)
    metrics_part(page, metrics)
    evaluation_part(page, layout, images)
    audit_part(page, layout, images, load(layout.audit_report))
    select_part(page, layout)
    title = f"tlcv report: {params.task}, {params.data.dataset}"
    dataset = load(layout.prepared / "dataset.json") or {}
    version = f"data {dataset['manifest_sha256'][:12]} · " if dataset.get("manifest_sha256") else ""
    nav = " &middot; ".join(f'<a href="#{esc(n)}">{esc(n)}</a>' for n in page.names)
    doc = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
           f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head><body>'
           f'<header><h1>{esc(title)}</h1><p>{esc(version)}{nav}</p></header>'
           f'<div id="broken"></div><main>{"".join(page.parts)}</main><script>{SCRIPT}</script></body></html>')
    return doc, page


def run(params: Params, layout: Layout, progress: Progress | None = None) -> ReportResult:
    t0 = time.perf_counter()
    doc, page = render(params, layout)
    write_text(layout.report_page, doc)  # atomic: a failed render leaves the last page
    return ReportResult(layout.report_page, page.names, page.images, time.perf_counter() - t0)


def describe(r: ReportResult) -> str:
    return (f"report: {r.path} ({', '.join(r.sections)}; {r.images} pictures inlined, "
            f"{r.path.stat().st_size / 1e6:.1f} MB), {r.seconds:.1f}s — open it in a browser")


def main() -> None:
    """The console script (tlcv-report) and `python -m tasks.report`."""
    stage_main("report", run, describe)


if __name__ == "__main__":
    main()
