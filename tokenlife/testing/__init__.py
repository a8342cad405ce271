"""Contract suites and fakes for tokenlife's seams, shipped so a plugin can prove itself."""
