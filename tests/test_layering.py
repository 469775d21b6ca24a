"""The import layers (coinlytics -> services -> shared) and thin routes, checked on the source tree.

Static: a violation is an import or attribute in the code, found without running a service."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The services whose routes get their service objects from the lifespan (ingest follows in its restructuring).
THIN_ROUTE_PACKAGES = ("pricing", "conversion", "gateway", "ingest", "alerting")


def python_files(folder: Path) -> Iterator[Path]:
    yield from sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            # `from services.pricing import repository` names the module in the alias.
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def upward_imports(root: Path) -> list[str]:
    """Imports against the layers: shared/ of services or coinlytics, services/ of coinlytics."""
    rules = {"shared": ("services", "coinlytics"), "services": ("coinlytics",)}
    found = []
    for layer, forbidden in rules.items():
        for path in python_files(root / layer):
            for line, module in imported_modules(path):
                if module.split(".")[0] in forbidden:
                    found.append(f"{path.relative_to(root)}:{line} imports {module}")
    return sorted(set(found))


def route_modules(root: Path) -> Iterator[Path]:
    for package in THIN_ROUTE_PACKAGES:
        for path in python_files(root / "services" / package):
            if path.name == "api.py":
                yield path


def fat_route_problems(root: Path) -> list[str]:
    """Route modules that reach a repository, or get service objects other than through lifespan_state."""
    problems = []
    for path in route_modules(root):
        where = path.relative_to(root)
        for line, module in imported_modules(path):
            if module.split(".")[-1] == "repository" or module == "shared.service_app.get_resources":
                problems.append(f"{where}:{line} uses {module}")
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            # request.app.state.X: the lifespan_state dependency is the one way in.
            if (
                isinstance(node, ast.Attribute)
                and node.attr == "state"
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "app"
            ):
                problems.append(f"{where}:{node.lineno} reads app.state directly")
    return sorted(set(problems))


def test_shared_never_imports_services_and_services_never_import_the_command() -> None:
    assert (ROOT / "coinlytics" / "cli.py").exists(), "the coinlytics command lives in coinlytics/cli.py"
    assert upward_imports(ROOT) == []


def test_routes_reach_no_repository_and_get_services_from_the_lifespan() -> None:
    assert sorted(p.relative_to(ROOT).as_posix() for p in route_modules(ROOT)) == [
        "services/alerting/api.py",
        "services/conversion/api.py",
        "services/gateway/api.py",
        "services/gateway/auth/api.py",
        "services/gateway/compat/api.py",
        "services/gateway/live/api.py",
        "services/gateway/reports/api.py",
        "services/gateway/tasks_monitor/api.py",
        "services/gateway/web/api.py",
        "services/ingest/api.py",
        "services/pricing/api.py",
        "services/pricing/coins/api.py",
        "services/pricing/history/api.py",
    ]
    assert fat_route_problems(ROOT) == []


# Writes that break the one-writer rule and are being moved by their owners' restructuring: (table, service).
# Delete an entry once its write is gone; a new write by a non-owner fails the test.
PENDING_FOREIGN_WRITES = {}
WRITE_CALLS = {"insert", "update", "delete"}
SQL_WRITE = re.compile(r"\b(?:INSERT\s+INTO|DELETE\s+FROM|UPDATE)\s+([a-z_]+)", re.IGNORECASE)


def table_writers(root: Path) -> dict[str, str]:
    """Table -> the service named by "Written by:" in its model's docstring in shared/models.py."""
    tree = ast.parse((root / "shared" / "models.py").read_text(encoding="utf-8"))
    writers = {}
    for node in tree.body:
        if not isinstance(node, ast.ClassDef) or node.name == "Base":
            continue
        table = next(
            stmt.value.value
            for stmt in node.body
            if isinstance(stmt, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "__tablename__" for t in stmt.targets)
            and isinstance(stmt.value, ast.Constant)
        )
        match = re.search(r"Written by: (\w+)", ast.get_docstring(node) or "")
        writers[table] = match.group(1) if match else ""
    return writers


def written_tables(path: Path, model_tables: dict[str, str]) -> Iterator[tuple[int, str]]:
    """Tables a module writes: insert/update/delete(Model), Model(...) rows, and raw SQL or helper calls
    naming a table (``delete_older_than(session, "ticks", ...)``)."""
    tables = set(model_tables.values())
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if name in WRITE_CALLS and node.args and isinstance(node.args[0], ast.Name):
                if node.args[0].id in model_tables:
                    yield node.lineno, model_tables[node.args[0].id]
            elif name in model_tables:
                yield node.lineno, model_tables[name]
            elif name == "delete_older_than" and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                yield node.lineno, str(node.args[1].value)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for match in SQL_WRITE.finditer(node.value):
                if match.group(1) in tables:
                    yield node.lineno, match.group(1)


def foreign_writes(root: Path) -> list[str]:
    tree = ast.parse((root / "shared" / "models.py").read_text(encoding="utf-8"))
    model_tables = {
        node.name: stmt.value.value
        for node in tree.body
        if isinstance(node, ast.ClassDef)
        for stmt in node.body
        if isinstance(stmt, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__tablename__" for t in stmt.targets)
        and isinstance(stmt.value, ast.Constant)
    }
    writers = table_writers(root)
    found = []
    for path in python_files(root / "services"):
        service = path.relative_to(root / "services").parts[0]
        for line, table in written_tables(path, model_tables):
            if writers.get(table) != service and (table, service) not in PENDING_FOREIGN_WRITES:
                found.append(f"{path.relative_to(root)}:{line} writes {table} (written by {writers.get(table)})")
    return sorted(set(found))


def test_every_table_names_its_one_writer_and_no_other_service_writes_it() -> None:
    writers = table_writers(ROOT)
    assert [table for table, writer in writers.items() if not writer] == []
    assert set(writers.values()) <= {"ingest", "pricing", "conversion", "gateway", "analytics", "alerting"}
    assert foreign_writes(ROOT) == []
