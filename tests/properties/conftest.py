"""Reports how many generated cases the property-based tests ran."""

from tests.properties.cases import CASES_RUN


def pytest_terminal_summary(terminalreporter):
    if CASES_RUN[0]:
        terminalreporter.write_line(f"property-based tests: {CASES_RUN[0]} generated cases run")
