pytest_plugins = ["tests.fixtures_simulator", "tests.fixtures_servers"]
