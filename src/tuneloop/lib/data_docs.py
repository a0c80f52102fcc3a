"""Data Docs that work with no network: the quality gate's site reads every script, style and font from its own
folder, and its index lists the validation results as plain HTML.

GX 1.24 pages pull jQuery, Bootstrap, Font Awesome and bootstrap-table from CDNs. Air-gapped (where companies
fine-tune on their own data) the index builds its table of results in JavaScript from bootstrap-table, so it
links to nothing, and status icons are blank. Here the index's tables are rendered by the template itself
(``StaticIndexPageView``), and after the build ``make_offline`` copies the assets from two PyPI packages,
bootstrap-flask (Bootstrap 4, jQuery, Popper) and fontawesomefree (Font Awesome 6, the version GX asks for),
into ``static/vendor/`` and points every page at them by relative path, so the folder works as well once logged
to MLflow and downloaded elsewhere. What only the JavaScript table needed (bootstrap-table, its date picker),
profiling charts (vega) and a dark theme are left out.

Imported only where Data Docs are built: it imports Great Expectations.
"""

from __future__ import annotations

import os
import re
import shutil
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from great_expectations.render.view import DefaultJinjaIndexPageView
from jinja2 import ChoiceLoader, DictLoader

from tuneloop.core.records import TuneloopError

VENDOR = "static/vendor"
# local copy under static/vendor -> (Python package, path inside it)
ASSETS = {
    "bootstrap4/css/bootstrap.min.css": ("flask_bootstrap", "static/bootstrap4/css/bootstrap.min.css"),
    "bootstrap4/jquery.min.js": ("flask_bootstrap", "static/bootstrap4/jquery.min.js"),
    "bootstrap4/umd/popper.min.js": ("flask_bootstrap", "static/bootstrap4/umd/popper.min.js"),
    "bootstrap4/js/bootstrap.min.js": ("flask_bootstrap", "static/bootstrap4/js/bootstrap.min.js"),
    "fontawesome/css/fontawesome.min.css": ("fontawesomefree", "static/fontawesomefree/css/fontawesome.min.css"),
    "fontawesome/css/solid.min.css": ("fontawesomefree", "static/fontawesomefree/css/solid.min.css"),  # GX's icons
    **{f"fontawesome/webfonts/fa-solid-900.{ext}": ("fontawesomefree", f"static/fontawesomefree/webfonts/fa-solid-900.{ext}")
       for ext in ("woff2", "ttf")},  # solid.min.css names both
}
DISTRIBUTIONS = {"flask_bootstrap": "bootstrap-flask", "fontawesomefree": "fontawesomefree"}
# a CDN address in GX's pages -> the local copies standing in for it; () where nothing is needed any more.
# An address matching none stays as it is (and tests/test_data_docs.py fails: a GX upgrade to look at).
CDN = [
    (re.compile(r"/bootstrap/4\.[\d.]+/css/bootstrap(\.min)?\.css$"), ["bootstrap4/css/bootstrap.min.css"]),
    (re.compile(r"/jquery-3\.[\d.]+(\.min)?\.js$"), ["bootstrap4/jquery.min.js"]),
    (re.compile(r"/popper\.js/1\.[\d.]+/umd/popper(\.min)?\.js$"), ["bootstrap4/umd/popper.min.js"]),
    (re.compile(r"/bootstrap/4\.[\d.]+/js/bootstrap(\.min)?\.js$"), ["bootstrap4/js/bootstrap.min.js"]),
    (re.compile(r"/font-awesome/6\.[\d.]+/css/all(\.min)?\.css$"),
     ["fontawesome/css/fontawesome.min.css", "fontawesome/css/solid.min.css"]),
    (re.compile(r"/bootstrap-table@|/bootstrap-datepicker/|/npm/vega|/bootstrap-dark@"), []),
]
LOGO = re.compile(r"https://great-expectations-web-assets\.[^\"')\s]*/[\w.-]+\.png(\?[^\"')\s]*)?")
# a long value without spaces (cut to SHOWN_CHARS, lib/gx.py) wraps instead of pushing its row's count, file and
# line out of sight
WRAP = "<style>td { overflow-wrap: anywhere; } th { white-space: nowrap; }</style>\n"
TAG = re.compile(r'<script\b[^>]*?\bsrc="(?P<src>[^"]+)"[^>]*>\s*</script>|<link\b[^>]*?\bhref="(?P<href>[^"]+)"[^>]*>')
GX_STATIC = re.compile(r'\b(?P<attr>src|href)="(?:\./|(?:\.\./)+)?(?P<path>static/[^"]+)"')

# bootstrap_table.j2 hands rows to bootstrap-table in JavaScript; this writes them into the page. A renderer's
# cell (a content block) is rendered as GX renders it; a value from the data (run name, asset) is escaped.
STATIC_TABLE = """{% include 'content_block_header.j2' %}
{% set columns = content_block["table_columns"] %}
<table id="{{ content_block_id }}-body-table" class="table table-sm table-hover ge-index-page-table">
  <thead><tr>{% for column in columns %}<th>{{ column["title"] | e }}</th>{% endfor %}</tr></thead>
  <tbody>
  {% for row in content_block["table_data"] %}
    {% set link = row.get("_table_row_link_path") %}
    <tr>
    {% for column in columns %}
      {% set value = row.get(column["field"]) %}
      {% if value is mapping %}<td>{{ value | render_content_block }}</td>
      {% elif link %}<td><a href="{{ link | e }}">{{ value | e }}</a></td>
      {% else %}<td>{{ value | e }}</td>{% endif %}
    {% endfor %}
    </tr>
  {% endfor %}
  </tbody>
</table>
"""


class StaticIndexPageView(DefaultJinjaIndexPageView):
    """GX's index page with its tables in the HTML: each validation result linked without JavaScript."""

    def __init__(self, custom_styles_directory=None, custom_views_directory=None) -> None:
        super().__init__(custom_styles_directory, custom_views_directory)
        self.env.loader = ChoiceLoader([DictLoader({"bootstrap_table.j2": STATIC_TABLE}), self.env.loader])


def site_config(docs_dir: Path) -> dict[str, Any]:
    """The run's site: a folder, the static index, no tutorial buttons (links out), no profiling section.
    The assets are looked for now, so that a missing package stops the gate before it reads a record."""
    for package, path in ASSETS.values():
        asset_source(package, path)
    return {
        "class_name": "SiteBuilder",
        "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder",
                               "view": {"module_name": __name__, "class_name": StaticIndexPageView.__name__}},
        "site_section_builders": {"profiling": "False"},
        "show_how_to_buttons": False,
    }


def asset_source(package: str, path: str) -> Path:
    """Where an installed package keeps a file, found without importing the package (bootstrap-flask imports Flask)."""
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TuneloopError(f"Data Docs need the package {DISTRIBUTIONS[package]}, which is not installed: "
                            f"pip install {DISTRIBUTIONS[package]} (or set quality.data_docs: false)")
    source = Path(next(iter(spec.submodule_search_locations))) / path
    if not source.is_file():
        raise TuneloopError(f"Data Docs: {source} is missing from the installed {DISTRIBUTIONS[package]}; "
                            f"reinstall it (pip install --force-reinstall {DISTRIBUTIONS[package]})")
    return source


def copy_assets(docs_dir: Path) -> None:
    for local, (package, path) in ASSETS.items():
        target = docs_dir / VENDOR / local
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(asset_source(package, path), target)


def _relative(target: Path, page_dir: Path) -> str:
    """How a page in ``page_dir`` addresses ``target``: a relative URL, so the site works wherever it is copied."""
    return Path(os.path.relpath(target, page_dir)).as_posix()


def _local_tags(url: str, page_dir: Path, docs_dir: Path) -> str | None:
    """The tags standing in for a CDN script or style sheet; None for an address not known here."""
    for pattern, locals_ in CDN:
        if pattern.search(url):
            tags = []
            for local in locals_:
                href = _relative(docs_dir / VENDOR / local, page_dir)
                tags.append(f'<script src="{href}"></script>' if local.endswith(".js")
                            else f'<link rel="stylesheet" href="{href}">')
            return "\n".join(tags)
    return None


def offline_page(text: str, page: Path, docs_dir: Path) -> str:
    """One page pointed at the site's own copies: CDN tags in its head replaced, GX's logo and static files
    addressed relative to where the page is (GX counts one folder too many on validation pages)."""
    head, sep, body = text.partition("</head>")
    if not sep:
        return text

    def tag(match: re.Match) -> str:
        url = match["src"] or match["href"]
        if url.startswith(("https://", "http://")):
            local = _local_tags(url, page.parent, docs_dir)
            return match[0] if local is None else local
        return match[0]

    def static(match: re.Match) -> str:
        return f'{match["attr"]}="{_relative(docs_dir / match["path"], page.parent)}"'

    logo = _relative(docs_dir / "static/images/logo-long.png", page.parent)
    head = LOGO.sub(logo, GX_STATIC.sub(static, TAG.sub(tag, head)))
    # in the body only GX's navbar puts a raw src="..." (values from the data are escaped: src=&quot;)
    body = re.sub(r'src="https://great-expectations-web-assets\.[^"]+"', f'src="{logo}"', body)
    return head + WRAP + sep + body


def make_offline(docs_dir: Path) -> None:
    """After GX built the site: the assets copied in, every page pointed at them."""
    copy_assets(docs_dir)
    for page in docs_dir.rglob("*.html"):
        text = page.read_bytes().decode("utf-8")  # bytes: a value's \r stays as it is
        page.write_bytes(offline_page(text, page, docs_dir).encode("utf-8"))
