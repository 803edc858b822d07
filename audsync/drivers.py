"""Which package to install when a database URL's driver is missing.

audsync installs only SQLite's driver (part of Python) and, with the
``postgres`` extra, psycopg. Any other source or state URL needs its
SQLAlchemy dialect or DBAPI driver installed beside audsync; SQLAlchemy's own
errors for a missing one (``No module named 'pymysql'``, ``Can't load plugin:
sqlalchemy.dialects:snowflake``) do not say what to install. :func:`driver_package`
does, from the URL alone.
"""

from __future__ import annotations

from sqlalchemy.engine import make_url
from sqlalchemy.exc import NoSuchModuleError

# (backend, driver) -> what to pip install. A driver of None is the backend's
# default driver when the URL names none (``postgresql://``); SQLAlchemy's
# default changes between versions, so :func:`driver_package` asks the
# installed SQLAlchemy first and only falls back to these.
_PACKAGES: dict[tuple[str, str | None], str] = {
    ("postgresql", "psycopg"): "psycopg[binary]",
    ("postgresql", "psycopg2"): "psycopg2-binary",
    ("postgresql", "pg8000"): "pg8000",
    ("postgresql", "asyncpg"): "asyncpg",
    ("mysql", "mysqldb"): "mysqlclient",
    ("mysql", "pymysql"): "pymysql",
    ("mysql", "mysqlconnector"): "mysql-connector-python",
    ("mysql", "asyncmy"): "asyncmy",
    ("mysql", "aiomysql"): "aiomysql",
    ("mariadb", "mysqldb"): "mysqlclient",
    ("mariadb", "pymysql"): "pymysql",
    ("mariadb", "mariadbconnector"): "mariadb",
    ("mssql", "pyodbc"): "pyodbc",
    ("mssql", "pymssql"): "pymssql",
    ("oracle", "oracledb"): "oracledb",
    ("oracle", "cx_oracle"): "cx_Oracle",
    # Third-party dialects: the dialect package brings (or names) its driver.
    ("duckdb", None): "duckdb-engine",
    ("snowflake", None): "snowflake-sqlalchemy",
    ("bigquery", None): "sqlalchemy-bigquery",
    ("trino", None): "trino",
    ("redshift", None): "sqlalchemy-redshift psycopg2-binary",
    ("redshift", "psycopg2"): "sqlalchemy-redshift psycopg2-binary",
    ("redshift", "redshift_connector"): "sqlalchemy-redshift redshift_connector",
    ("databricks", None): "databricks-sqlalchemy",
    ("clickhouse", None): "clickhouse-sqlalchemy",
    ("awsathena", None): "pyathena[SQLAlchemy]",
    ("awsathena", "rest"): "pyathena[SQLAlchemy]",
    ("hana", None): "sqlalchemy-hana",
    ("ibm_db_sa", None): "ibm_db_sa",
    ("db2", None): "ibm_db_sa",
    ("teradatasql", None): "teradatasqlalchemy",
    ("exa", None): "sqlalchemy-exasol",
    ("cockroachdb", None): "sqlalchemy-cockroachdb psycopg2-binary",
}
_DEFAULT_DRIVERS = {
    "postgresql": "psycopg2",
    "mysql": "mysqldb",
    "mariadb": "mysqldb",
    "mssql": "pyodbc",
    "oracle": "oracledb",
}
_POSTGRES_EXTRA = "psycopg[binary]"
"""What audsync's ``postgres`` extra installs (pyproject.toml)."""


def driver_package(backend: str, driver: str | None) -> str | None:
    """What to ``pip install`` for ``backend+driver`` (``driver`` None: the URL named
    none), or None when audsync does not know the dialect."""
    backend, driver = backend.lower(), (driver or None) and driver.lower()
    if (backend, driver) in _PACKAGES:
        return _PACKAGES[backend, driver]
    if driver is None and backend in _DEFAULT_DRIVERS:
        return _PACKAGES[backend, _DEFAULT_DRIVERS[backend]]
    if (backend, None) in _PACKAGES:
        # A third-party dialect with a driver we do not list: the dialect first.
        return _PACKAGES[backend, None]
    return None


def is_missing_driver(exc: BaseException) -> bool:
    """Whether ``exc`` (from create_engine) means a dialect or driver is not installed."""
    return isinstance(exc, ModuleNotFoundError | NoSuchModuleError)


def missing_driver_hint(url: str) -> str:
    """What to install for ``url``, as a clause for an error message. Never echoes the URL."""
    try:
        parsed = make_url(url)
    except Exception:
        return "its SQLAlchemy driver is not installed"
    backend = parsed.get_backend_name()
    named = parsed.drivername.partition("+")[2] or None
    driver = named
    if driver is None:
        # The installed SQLAlchemy's own default (psycopg2 on 2.0, psycopg on 2.1);
        # loading a built-in dialect does not import its driver.
        try:
            driver = parsed.get_dialect().driver
        except Exception:
            driver = None
    package = driver_package(backend, driver)
    if package is None:
        return (
            f"no SQLAlchemy dialect or driver for {parsed.drivername!r} is installed"
            " (install the package that provides it next to audsync)"
        )
    what = f"{backend}+{driver}" if driver else backend
    command = f"pip install {_quoted(package)}"
    if package == _POSTGRES_EXTRA:
        command += " (audsync's postgres extra: pip install '.[postgres]' in its checkout)"
    return f"the {what} driver is not installed: {command}"


def _quoted(package: str) -> str:
    return " ".join(f"'{p}'" if "[" in p else p for p in package.split())
