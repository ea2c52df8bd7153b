"""Prints the commands README.md gives a new user, so CI runs exactly what README says.

  python3 .ci/readme_commands.py [N]

The commands are the ```bash fences of README's "On a fresh machine" section, in order (the
set-up + main job, then the test command); with N, only the N-th (1-based). Exits 1 unless the
section holds exactly two, so README and CI cannot drift apart silently.
"""

import pathlib
import re
import sys

SECTION = "On a fresh machine"
EXPECTED = 2


def commands(readme: str) -> list[str]:
  """The bash fences of the SECTION heading's section (up to the next heading of its level or
  higher), each as one command: continuation lines (`\\` + newline) joined."""
  lines = readme.splitlines()
  start = next((i for i, l in enumerate(lines)
                if re.fullmatch(rf"(#+)\s+{re.escape(SECTION)}\s*", l)), None)
  if start is None:
    raise ValueError(f"README.md: no heading {SECTION!r}")
  level = len(lines[start]) - len(lines[start].lstrip("#"))
  found, fence = [], None
  for line in lines[start + 1:]:
    if fence is None:
      heading = re.match(r"(#+)\s", line)
      if heading and len(heading.group(1)) <= level:
        break
      if re.fullmatch(r"```bash\s*", line):
        fence = []
    elif line.strip() == "```":
      found.append("\n".join(fence).replace("\\\n", "").strip())
      fence = None
    else:
      fence.append(line)
  return found


def main(argv: list[str]) -> int:
  readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
  found = commands(readme.read_text())
  if len(found) != EXPECTED:
    print(f"README.md: {len(found)} bash commands under {SECTION!r}, expected {EXPECTED}",
          file=sys.stderr)
    return 1
  if len(argv) > 1:
    print(found[int(argv[1]) - 1])
  else:
    print("\n".join(found))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
