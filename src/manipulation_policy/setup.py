from setuptools import find_packages, setup

PACKAGE = "manipulation_policy"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="MobileManipulationCore maintainers",
    maintainer_email="maintainers@users.noreply.github.com",
    description="VLA policy nodes, HTTP policy server and backends",
    license="Apache-2.0",
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "policy_server = manipulation_policy.policy_server:main",
            "policy_node = manipulation_policy.nodes.policy_node:main",
            "remote_policy_node = manipulation_policy.nodes.remote_policy_node:main",
            "task_prompt_cli = manipulation_policy.task_prompt_cli:main",
            "policy_replay = manipulation_policy.replay.cli:main",
        ],
    },
)
