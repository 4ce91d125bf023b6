"""Summary of a mutmut run (`make mutation`): a Markdown table per module and the diff of every survivor.

Run from the mutation folder (build/mutation). Writes ``mutation-summary.md`` (the table) and
``survivors.diff`` (each surviving or untested mutant's diff, grouped by module) there and prints the table.
Mutants that only wrap a string literal in "XX" (mutmut's string mutation) are counted apart: when that string
is an error message the tests match by content, the mutant changes no behaviour but the message's decoration.
"""

from collections import Counter, defaultdict
from pathlib import Path

from mutmut.configuration import config
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

COLUMNS = ("killed", "survived", "timeout", "no tests", "suspicious", "segfault", "not checked")


def _only_decorates_a_string(diff: str) -> bool:
    removed = [line[1:] for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    return len(removed) == len(added) >= 1 and all(
        a != r and a.replace("XX", "") == r.replace("XX", "") for r, a in zip(removed, added)
    )


def main() -> None:
    config()
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
                    status = "survived (XX string)"
                diffs[module].append(f"# {name}: {status}\n{diff}\n")
            counts[module][status] += 1
    columns = (*COLUMNS[:2], "survived (XX string)", *COLUMNS[2:])
    lines = [
        "| module | mutants | " + " | ".join(columns) + " | killed % | killed % without XX strings |",
        "| --- | ---: | " + " | ".join("---:" for _ in columns) + " | ---: | ---: |",
    ]
    total = Counter()
    for module in [*sorted(counts), "all"]:
        row = total if module == "all" else counts[module]
        if module != "all":
            total.update(row)
        tested = sum(row.values()) - row["no tests"] - row["not checked"]
        killed = row["killed"] + row["timeout"]
        score = 100 * killed / tested if tested else 0.0
        strict = tested - row["survived (XX string)"]
        score_strict = 100 * killed / strict if strict else 0.0
        lines.append(
            f"| {module} | {sum(row.values())} | "
            + " | ".join(str(row[c]) for c in columns)
            + f" | {score:.1f} | {score_strict:.1f} |"
        )
    table = "\n".join(lines) + "\n"
    Path("mutation-summary.md").write_text(table)
    Path("survivors.diff").write_text("".join(f"## {m}\n\n" + "\n".join(d) + "\n" for m, d in sorted(diffs.items())))
    print(table)


if __name__ == "__main__":
    main()
