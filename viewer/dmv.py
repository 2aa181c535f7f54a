"""Our results in dicom-microscopy-viewer, the engine of Slim and of OHIF's microscopy mode.

``/dmv/<series>`` opens a stored slide with the library's ``VolumeImageViewer`` over our own
``/dicomweb`` and adds what the node made for it: the Microscopy Bulk Simple Annotations (every
cell, one group per class and kind), the Segmentation (heatmaps) and the SR's cell outlines with
their measurements. ``/dmv/?dicomweb=URL&study=UID&series=UID`` is the same page against any
DICOMweb base URL; the browser calls that server directly, so it must be this origin or send CORS
headers. ``python -m viewer.dmv export DIR`` writes the page as static files (index.html, its
script, the library's bundle) to serve next to any DICOMweb server (Orthanc's ServeFolders plugin,
nginx) under the same origin. The library is npm's ``dicom-microscopy-viewer`` (``npm ci``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import jinja2
from flask import Blueprint, Response, abort, render_template, request, send_from_directory, url_for

from dicom_node.store import queries
from viewer import cases, common
from viewer.auth import login_required

bp = Blueprint("dmv", __name__)
bp.before_request(common.check_csrf)

ROOT = Path(__file__).resolve().parent
NODE_MODULES = ROOT.parent / "node_modules"
#: The library's single-bundle build: the script, its data-loader worker and the codecs' wasm.
DMV_DIR = NODE_MODULES / "dicom-microscopy-viewer" / "dist"
DICOMWEB_CLIENT_DIR = NODE_MODULES / "dicomweb-client" / "build"
#: Files of DMV_DIR the page needs (source maps and licence notes stay out of a static export).
DMV_SUFFIXES = (".js", ".wasm")
#: The bundle starts its decoding worker as ``dataLoader.worker.min.js`` next to itself (at
#: PUBLIC_LIB_URL), a module worker; the build's file of that worker is named differently. Being a
#: UMD script with no ``this`` in a module, it ends with a TypeError after it has set itself up
#: (reported as a page error; harmless, see docs/viewers.md).
WORKER = "dataLoader.worker.min.js"
WORKER_FILE = "dataLoader.worker.bundle.min.js"

#: The page's own policy: the app's, except that OpenLayers and the library set inline styles on
#: their controls and legend, draw from blob:/data: images, OpenLayers' WebGL vector layers (the
#: annotation centres) run a blob: worker, and ``connect-src`` also names, on the
#: stand-alone page, the DICOMweb server the URL names. Scripts stay 'self' only: the codecs run
#: in the worker, which has its own policy (``_WORKER_CSP``).
_CSP = ("default-src 'self'; script-src 'self'; worker-src 'self' blob:; "
        "style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'{extra}; "
        "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


#: The decoding worker's policy: its emscripten codecs evaluate strings and compile WebAssembly.
_WORKER_CSP = ("default-src 'self'; script-src 'self' 'unsafe-eval' 'wasm-unsafe-eval'; "
               "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")


def _page(config: dict[str, str], connect: str = "") -> Response:
    assets = {
        "css": url_for("static", filename="dmv.css"),
        "script": url_for("static", filename="dmv.js"),
        "dmv": url_for("dmv.vendor_dmv", filename="dicomMicroscopyViewer.bundle.min.js"),
        "dicomweb_client": url_for("dmv.vendor_dicomweb_client", filename="dicomweb-client.js"),
    }
    response = Response(render_template("dmv.html", assets=assets, config=config))
    response.headers["Content-Security-Policy"] = _CSP.format(extra=f" {connect}" if connect else "")
    return response


def _origin(url: str) -> str:
    """The scheme://host[:port] of an absolute http(s) URL, for connect-src; "" otherwise."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme in ("http", "https") and parts.netloc and all(c not in parts.netloc for c in " ;'\""):
        return f"{parts.scheme}://{parts.netloc}"
    return ""


@bp.get("/dmv/")
@login_required
def standalone() -> Response:
    """The viewer against the DICOMweb server, study and series named in the query string."""
    base = request.args.get("dicomweb", "")
    return _page({"dicomweb": base, "study": request.args.get("study", ""),
                  "series": request.args.get("series", "")}, connect=_origin(base))


@bp.get("/dmv/<series_instance_uid>")
@login_required
def view(series_instance_uid: str) -> Response:
    """A stored slide over our own /dicomweb (the logged-in session authorises its requests)."""
    cases.checked_uid(series_instance_uid)
    of_series = queries.study_of_series(common.store(), series_instance_uid)
    if of_series is None:
        abort(404)
    study = of_series.study_instance_uid
    common.record("view", series_instance_uid, "dmv")
    base = url_for("dicomweb.search_studies").rsplit("/studies", 1)[0]
    return _page({"dicomweb": base, "study": study, "series": series_instance_uid})


@bp.get("/vendor/dicom-microscopy-viewer/<path:filename>")
def vendor_dmv(filename: str) -> Any:
    """The library's bundle, worker and wasm codecs (relative to the bundle: publicPath 'auto')."""
    if not filename.endswith(DMV_SUFFIXES):
        abort(404)
    response = send_from_directory(DMV_DIR, WORKER_FILE if filename == WORKER else filename,
                                   max_age=3600)
    if filename == WORKER:  # a worker runs under its own script's policy: the codecs need eval
        response.headers["Content-Security-Policy"] = _WORKER_CSP
    return response


@bp.get("/vendor/dicomweb-client/<path:filename>")
def vendor_dicomweb_client(filename: str) -> Any:
    if filename != "dicomweb-client.js":
        abort(404)
    return send_from_directory(DICOMWEB_CLIENT_DIR, filename, max_age=3600)


def export_static(dest: Path, *, dicomweb: str = "") -> Path:
    """Write the stand-alone page (index.html and what it loads, all by relative URL) to ``dest``.

    ``dicomweb`` is the default DICOMweb base URL (e.g. ``/dicom-web`` next to Orthanc); the
    query parameters ``dicomweb``, ``study`` and ``series`` override it. Returns ``dest``.
    """
    if not (DMV_DIR / "dicomMicroscopyViewer.bundle.min.js").exists():
        raise FileNotFoundError(f"{DMV_DIR} is missing: run `npm ci` in {ROOT.parent}")
    dest.mkdir(parents=True, exist_ok=True)
    vendor = dest / "vendor" / "dicom-microscopy-viewer"
    vendor.mkdir(parents=True, exist_ok=True)
    for path in DMV_DIR.iterdir():
        if path.is_file() and path.name.endswith(DMV_SUFFIXES):
            shutil.copyfile(path, vendor / path.name)
    shutil.copyfile(DMV_DIR / WORKER_FILE, vendor / WORKER)
    (dest / "vendor" / "dicomweb-client").mkdir(exist_ok=True)
    shutil.copyfile(DICOMWEB_CLIENT_DIR / "dicomweb-client.js",
                    dest / "vendor" / "dicomweb-client" / "dicomweb-client.js")
    # The libraries' licences (MIT) and the third-party notices of the bundles go with them.
    for package, folder in (("dicom-microscopy-viewer", vendor),
                            ("dicomweb-client", dest / "vendor" / "dicomweb-client")):
        licence = NODE_MODULES / package / "LICENSE"
        if licence.exists():
            shutil.copyfile(licence, folder / "LICENSE")
    for notice in DMV_DIR.glob("*.LICENSE.txt"):
        shutil.copyfile(notice, vendor / notice.name)
    for name in ("dmv.js", "dmv.css"):
        shutil.copyfile(ROOT / "static" / name, dest / name)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(ROOT / "templates"), autoescape=True)
    assets = {"css": "dmv.css", "script": "dmv.js",
              "dmv": "vendor/dicom-microscopy-viewer/dicomMicroscopyViewer.bundle.min.js",
              "dicomweb_client": "vendor/dicomweb-client/dicomweb-client.js"}
    html = env.get_template("dmv.html").render(
        assets=assets, config={"dicomweb": dicomweb, "study": "", "series": ""})
    (dest / "index.html").write_text(html)
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m viewer.dmv", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the stand-alone page to a folder")
    export.add_argument("dest", type=Path)
    export.add_argument("--dicomweb", default="", help="default DICOMweb base URL, e.g. /dicom-web")
    args = parser.parse_args(argv)
    print(export_static(args.dest, dicomweb=args.dicomweb))
    return 0


if __name__ == "__main__":
    sys.exit(main())
