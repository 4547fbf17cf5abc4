"""Built-in collectors, one module each; registered in the ``taskd.collectors`` entry-point group."""
