"""Packaging: the gateway package plus the twistd dropin in ``twisted/plugins``.

``find_packages`` cannot see ``twisted.plugins`` (it must have no ``__init__.py``), so
it is listed explicitly.  After installing, regenerate the plugin cache with
``python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"``.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["gateway", "gateway.*"]), "twisted.plugins"],
)
