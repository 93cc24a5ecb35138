"""Shared by the RAG tests: a minimal PDF writer (so tests need no PDF-writing library) and small corpora."""

from __future__ import annotations

from pathlib import Path


def make_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one page per string (Helvetica, one text line per line of the string)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(len(pages)))}] "
               f"/Count {len(pages)} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        lines = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in text.split("\n")]
        stream = "BT /F1 11 Tf 72 740 Td 14 TL " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
                       f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


TOPICS = {
    "volcano": "Volcanoes erupt when magma rises through the crust. Lava flows cool into basalt rock. "
               "Ash clouds from an eruption can ground aircraft for days.",
    "bread": "Bread rises because yeast ferments sugar into carbon dioxide. Kneading builds gluten. "
             "A hot oven sets the crumb and browns the crust.",
    "orbit": "A satellite stays in orbit because its speed balances the pull of gravity. Higher orbits are "
             "slower. Geostationary satellites circle the Earth once a day.",
    "violin": "A violin has four strings tuned in fifths. The bow is strung with horsehair and rosin. "
              "The sound post carries vibrations from the top to the back.",
    "tides": "Tides are caused mainly by the Moon's gravity. Spring tides happen at new and full moon. "
             "Most coasts see two high tides a day.",
}


def write_corpus(folder: Path, topics: dict[str, str] = TOPICS) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in topics.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text(text + "\n", encoding="utf-8")
    return paths
