// The Run-Flare editor: CodeMirror 6 with the languages Run-Flare runs, bundled once by build.sh into
// server/runflare_server/static/runflare-editor.js (global RunFlareEditor). Used by /embed.js and the playground.
import { closeBrackets, closeBracketsKeymap } from "@codemirror/autocomplete";
import { defaultKeymap, history, historyKeymap, indentWithTab } from "@codemirror/commands";
import { cpp } from "@codemirror/lang-cpp";
import { go } from "@codemirror/lang-go";
import { java } from "@codemirror/lang-java";
import { javascript } from "@codemirror/lang-javascript";
import { python } from "@codemirror/lang-python";
import { rust } from "@codemirror/lang-rust";
import { sql } from "@codemirror/lang-sql";
import { bracketMatching, defaultHighlightStyle, indentOnInput, indentUnit, StreamLanguage,
  syntaxHighlighting } from "@codemirror/language";
import { perl } from "@codemirror/legacy-modes/mode/perl";
import { ruby } from "@codemirror/legacy-modes/mode/ruby";
import { shell } from "@codemirror/legacy-modes/mode/shell";
import { highlightSelectionMatches, search, searchKeymap } from "@codemirror/search";
import { Compartment, EditorState } from "@codemirror/state";
import { drawSelection, EditorView, highlightActiveLine, highlightActiveLineGutter, keymap,
  lineNumbers } from "@codemirror/view";

// By Judge0 language id (a kernel run's id is 1000 + it).
const MODES = {
  71: () => python(), 50: () => cpp(), 54: () => cpp(), 62: () => java(), 63: () => javascript(),
  74: () => javascript({ typescript: true }), 73: () => rust(), 60: () => go(), 82: () => sql(),
  72: () => StreamLanguage.define(ruby), 85: () => StreamLanguage.define(perl), 46: () => StreamLanguage.define(shell),
};
// By name, for languages given as names (the playground's language labels, data-runflare values).
const NAMES = [[/^python|^py$/i, 71], [/^c\+\+|^cpp/i, 54], [/^c\b/i, 50], [/^java\b/i, 62],
  [/^typescript|^ts$/i, 74], [/^javascript|^js$/i, 63], [/^rust/i, 73], [/^go\b/i, 60], [/^sql/i, 82],
  [/^ruby/i, 72], [/^perl/i, 85], [/^bash|^sh$/i, 46]];

export function languageId(language) {
  if (typeof language === "number" || /^[0-9]+$/.test(String(language))) return Number(language) % 1000;
  const hit = NAMES.find(([re]) => re.test(String(language || "")));
  return hit ? hit[1] : 0;
}
function mode(language) {
  const make = MODES[languageId(language)];
  return make ? make() : [];
}

const theme = EditorView.theme({
  "&": { border: "1px solid #d9dde3", borderRadius: "5px", backgroundColor: "#fbfbfc", fontSize: "13.5px" },
  "&.cm-focused": { outline: "3px solid #1f6feb", outlineOffset: "1px" },
  ".cm-scroller": { fontFamily: 'ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono", monospace',
    lineHeight: "1.5", overflow: "auto" },
  ".cm-content": { padding: ".4em 0" },
  ".cm-gutters": { backgroundColor: "#f3f4f6", color: "#98a2b3", border: "none", borderRight: "1px solid #e4e7ec" },
  "&:not(.cm-focused) .cm-activeLine, &:not(.cm-focused) .cm-activeLineGutter": { backgroundColor: "transparent" },
});

/** An editor in `parent`. options: doc, language (a Judge0 id or a name), readOnly, onRun (Ctrl/Cmd+Enter),
 * onChange(text), attributes (on the editable element: aria-label, aria-describedby, id, ...), minHeight, maxHeight. */
export function create(parent, options = {}) {
  const language = new Compartment();
  const editable = new Compartment();
  const extensions = [
    lineNumbers(), highlightActiveLineGutter(), history(), drawSelection(), indentOnInput(), bracketMatching(),
    closeBrackets(), highlightActiveLine(), highlightSelectionMatches(), search({ top: true }),
    syntaxHighlighting(defaultHighlightStyle, { fallback: true }), indentUnit.of("    "), EditorState.tabSize.of(4),
    keymap.of([
      { key: "Mod-Enter", run: () => { if (options.onRun) options.onRun(); return true; } },
      ...closeBracketsKeymap, ...defaultKeymap, ...historyKeymap, ...searchKeymap, indentWithTab,
    ]),
    language.of(mode(options.language)),
    editable.of(EditorState.readOnly.of(!!options.readOnly)),
    EditorView.contentAttributes.of(options.attributes || {}),
    EditorView.updateListener.of((u) => { if (u.docChanged && options.onChange) options.onChange(u.state.doc.toString()); }),
    theme,
    EditorView.theme({ ".cm-scroller": { minHeight: options.minHeight || "4.5em", maxHeight: options.maxHeight || "30em" } }),
  ];
  const view = new EditorView({ doc: options.doc || "", extensions, parent });
  return {
    view,
    getCode: () => view.state.doc.toString(),
    setCode: (text) => view.dispatch({ changes: { from: 0, to: view.state.doc.length, insert: text } }),
    setLanguage: (lang) => view.dispatch({ effects: language.reconfigure(mode(lang)) }),
    setReadOnly: (ro) => view.dispatch({ effects: editable.reconfigure(EditorState.readOnly.of(!!ro)) }),
    focus: () => view.focus(),
    destroy: () => view.destroy(),
  };
}

export const version = "1";
