"""Summary of a mutmut run (`make mutation`): a Markdown table per module and the diff of every survivor.

Run from the mutation folder (build/mutation). Writes ``mutation-summary.md`` (the table) and
``survivors.diff`` (each surviving or untested mutant's diff, grouped by module) there and prints the table.
Mutants that only wrap a string literal in "XX" (mutmut's string mutation) are counted apart: when that string
is an error message the tests match by content, the mutant changes no behaviour but the message's decoration.

``docs/mutation-equivalent.txt`` (next to this tool's repository root) lists survivors judged equivalent, one
``<mutant name> <reason tag>`` per line (``#`` starts a comment); the tag ``gpu`` marks mutants only a GPU run can
decide (tensors built with ``device=None`` land on the CPU, where they belong on this machine). Listed survivors
are counted in their own columns and left out of the last score, "killed % of the rest".
"""

from collections import Counter, defaultdict
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

COLUMNS = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "not checked")
EQUIVALENT_LIST = Path(__file__).resolve().parent.parent / "docs" / "mutation-equivalent.txt"


def _equivalents() -> dict[str, str]:
    """Mutant name -> reason tag, from EQUIVALENT_LIST (empty when the file is missing)."""
    if not EQUIVALENT_LIST.exists():
        return {}
    listed = {}
    for line in EQUIVALENT_LIST.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, tag = line.split()
            listed[name] = tag
    return listed


def _only_decorates_a_string(diff: str) -> bool:
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return len(removed) == len(added) >= 1 and all(
        a != r and a.replace("XX", "") == r.replace("XX", "") for r, a in zip(removed, added)
    )


def main() -> None:
    config()
    listed = _equivalents()
    counts: dict[str, Counter] = defaultdict(Counter)
    diffs: dict[str, list[str]] = defaultdict(list)
    for path in walk_mutatable_files():
        data = SourceFileMutationData(path=path)
        data.load()
        module = str(path)[: -len(".py")].replace("/", ".")
        for name, exit_code in sorted(data.exit_code_by_key.items()):
            status = status_by_exit_code[exit_code]
            if status in ("survived", "no tests"):
                diff = get_diff_for_mutant(name, path=path)
                if status == "survived" and _only_decorates_a_string(diff):
                    counts[module]["xx any"] += 1  # for the column without XX strings, listed or not
                if status == "survived" and name in listed:
                    status = "needs a GPU" if listed[name] == "gpu" else "equivalent"
                    diffs[module].append(f"# {name}: survived, {status} ({listed[name]})\n{diff}\n")
                else:
                    if status == "survived" and _only_decorates_a_string(diff):
                        status = "survived (XX string)"
                    diffs[module].append(f"# {name}: {status}\n{diff}\n")
            counts[module][status] += 1
    columns = (*COLUMNS[:2], "survived (XX string)", "equivalent", "needs a GPU", *COLUMNS[2:])
    lines = [
        "| module | mutants | "
        + " | ".join(columns)
        + " | killed % | killed % without XX strings | killed % of the rest |",
        "| --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: | ---: | ---: |",
    ]
    total = Counter()
    for module in [*sorted(counts), "all"]:
        row = total if module == "all" else counts[module]
        if module != "all":
            total.update(row)
        tested = sum(row.values()) - row["no tests"] - row["not checked"] - row["xx any"]
        killed = row["killed"] + row["timeout"]
        score = 100 * killed / tested if tested else 0.0
        strict = tested - row["survived (XX string)"] - row["equivalent"] - row["needs a GPU"]
        without_strings = 100 * killed / (tested - row["xx any"]) if tested > row["xx any"] else 0.0
        rest = 100 * killed / strict if strict else 0.0
        lines.append(
            f"| {module} | {sum(row.values()) - row['xx any']} | "
            + " | ".join(str(row[c]) for c in columns)
            + f" | {score:.1f} | {without_strings:.1f} | {rest:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    Path("mutation-summary.md").write_text(table)
    Path("survivors.diff").write_text("".join(f"## {m}\n\n" + "\n".join(d) + "\n" for m, d in sorted(diffs.items())))
    print(table)


if __name__ == "__main__":
    main()
