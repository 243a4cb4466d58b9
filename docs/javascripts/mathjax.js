// MathJax set-up for pymdownx.arithmatex (generic mode): \( \) inline, \[ \] and $$ display.
// MathJax itself is served by the site (javascripts/mathjax/tex-svg.js, see SOURCE.txt
// there): formulas render as SVG with no network and no web fonts.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  svg: {
    fontCache: "global",
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

document$.subscribe(() => {
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
