"""A real headless Chromium for the tests of the pages vggt-sfm serves or writes (Debian's `chromium` and
`chromium-driver`, driven by selenium), with WebGL in software as on a machine without a GPU."""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import numpy as np

CHROMEDRIVER = Path("/usr/bin/chromedriver")


def browser_unavailable() -> str | None:
    """Why the browser tests cannot run here (the skip reason), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    if shutil.which("chromium") is None:
        return "Debian package chromium is not installed (apt-get install -y chromium chromium-driver)"
    if not CHROMEDRIVER.exists():
        return "Debian package chromium-driver is not installed (apt-get install -y chromium chromium-driver)"
    return None


def headless_chromium(profile_parent: Path, width: int = 1300, height: int = 1000):
    """A selenium driver of a fresh headless Chromium that keeps the console and network logs; `quit()` it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
                 f"--user-data-dir={tempfile.mkdtemp(dir=profile_parent)}", f"--window-size={width},{height}",
                 # WebGL (plotly's 3D view, viser's scene) in software, as a machine without a GPU has it
                 "--use-angle=swiftshader", "--enable-unsafe-swiftshader"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    return webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)


def distinct_colours(png: bytes) -> int:
    """How many different RGB colours a PNG screenshot holds (a blank one holds one or two)."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return len(np.unique(image, axis=0))
