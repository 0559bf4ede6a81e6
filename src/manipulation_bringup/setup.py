from glob import glob

from setuptools import find_packages, setup

PACKAGE = "manipulation_bringup"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="MobileManipulationCore maintainers",
    maintainer_email="maintainers@users.noreply.github.com",
    description="Launch files and configuration of the MobileManipulationCore stack",
    license="Apache-2.0",
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "demo = manipulation_bringup.demo:main",
        ],
    },
)
