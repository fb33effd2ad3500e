"""Characters a font draws alike: which of them the renderer would draw (so two texts would share a sketch).

    python benchmarks/lookalikes.py --font DejaVuSansMono.ttf --cells 16:8x16 12:4x8 --name lookalikes-dejavu

Every code point of the Basic Multilingual Plane (surrogates aside) is looked up in the glyph atlas of each
`font_size:WxH` cell, as the renderer looks it up (`GlyphAtlas.lookup`: characters without a glyph, and lookalikes of
an earlier character of `LOOKALIKE_REPERTOIRE`, are reported instead of drawn). The drawn characters are grouped by
their cell's pixels; a group of two or more is a pair of texts that draw the same sketch. Writes
`benchmarks/results/<name>.md` (the groups, each character with its code point).
"""

import argparse
import datetime
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from vist2.processing_vist2 import LOOKALIKE_REPERTOIRE, GlyphAtlas  # noqa: E402


def drawn_alike(font: str, size: int, width: int, height: int) -> tuple[int, list[list[str]]]:
    """(characters drawn, groups of drawn characters whose cells are the same)."""
    atlas = GlyphAtlas(font, size, width, height, 0, 255)
    cells = {}
    for code in [*range(0x20, 0xD800), *range(0xE000, 0x10000)]:
        index = atlas.lookup(chr(code))
        if index:  # (0 is blank paper: the space)
            cells.setdefault(atlas.glyphs[index].tobytes(), []).append(chr(code))
    return sum(map(len, cells.values())), [group for group in cells.values() if len(group) > 1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--font", default=str(HERE.parent / "DejaVuSansMono.ttf"))
    parser.add_argument("--cells", nargs="+", default=["16:8x16", "12:4x8"], help="font_size:WIDTHxHEIGHT")
    parser.add_argument("--name", default="lookalikes")
    args = parser.parse_args()
    lines = [f"# Characters drawn alike: {Path(args.font).name}", "", "```", f"python benchmarks/lookalikes.py --font "
             f"{Path(args.font).name} --cells {' '.join(args.cells)} --name {args.name}", "```", "",
             f"{datetime.datetime.now().isoformat(timespec='seconds')}. Code points U+0020-U+FFFF; the lookalike check "
             f"compares a character with those before it among the {len(LOOKALIKE_REPERTOIRE)} of `LOOKALIKE_REPERTOIRE` "
             "(processing_vist2.py); a group below is drawn alike although it should not be.", ""]
    for cell in args.cells:
        size, shape = cell.split(":")
        width, height = map(int, shape.split("x"))
        count, groups = drawn_alike(args.font, int(size), width, height)
        heading = f"## {size} px glyphs in {width}x{height} cells: {count} characters drawn, {len(groups)} groups alike"
        lines += [heading, "", *(f"- {' '.join(f'{char} U+{ord(char):04X}' for char in group)}" for group in groups), ""]
        print(heading)
    out = HERE / "results" / f"{args.name}.md"
    out.write_text("\n".join(lines))
    print("wrote", out)


if __name__ == "__main__":
    main()
