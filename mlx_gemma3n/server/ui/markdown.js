// Markdown to DOM nodes. Model output is text: every piece of it reaches the page through
// document.createTextNode / textContent, never as HTML, so a reply holding markup renders as the
// characters it is. Links keep only http(s) and mailto targets; any other is shown as plain text.

const SAFE_LINK = /^(https?:|mailto:)/i;

function element(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

// Inline spans: `code`, **bold**, *italic* / _italic_, [text](url); the rest is text.
const INLINE = /(`+)([\s\S]+?)\1|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*|\b_([^_]+)_\b|\[([^\]]+)\]\(([^)\s]+)\)/g;

function appendInline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    if (match.index > last) parent.append(text.slice(last, match.index));
    const [whole, , code, bold, italic, underscored, label, href] = match;
    if (code !== undefined) {
      parent.append(Object.assign(element("code"), { textContent: code }));
    } else if (bold !== undefined) {
      appendInline(parent.appendChild(element("strong")), bold);
    } else if (italic !== undefined || underscored !== undefined) {
      appendInline(parent.appendChild(element("em")), italic ?? underscored);
    } else if (SAFE_LINK.test(href)) {
      const link = Object.assign(element("a"), { href, textContent: label, rel: "noopener noreferrer", target: "_blank" });
      parent.append(link);
    } else {
      parent.append(whole);
    }
    last = match.index + whole.length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function appendLines(parent, lines) {
  lines.forEach((line, i) => {
    if (i) parent.append(element("br"));
    appendInline(parent, line);
  });
}

const LIST_ITEM = /^(\s*)([-*+]|\d+[.)])\s+(.*)$/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const FENCE = /^\s*(```|~~~)\s*([\w+-]*)\s*$/;

// Block structure: fenced code, headings, lists, quotes, paragraphs. An unclosed fence (a reply
// still streaming) runs to the end.
export function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    if (fence) {
      const body = [];
      for (i += 1; i < lines.length && !lines[i].trim().startsWith(fence[1]); i += 1) body.push(lines[i]);
      i += 1;
      const pre = element("pre");
      const code = pre.appendChild(element("code"));
      if (fence[2]) code.dataset.language = fence[2];
      code.textContent = body.join("\n");
      root.append(pre);
      continue;
    }
    const heading = line.match(HEADING);
    if (heading) {
      appendInline(root.appendChild(element(`h${Math.min(heading[1].length + 2, 6)}`)), heading[2]);
      i += 1;
      continue;
    }
    if (LIST_ITEM.test(line)) {
      const ordered = /\d/.test(line.match(LIST_ITEM)[2]);
      const list = root.appendChild(element(ordered ? "ol" : "ul"));
      for (; i < lines.length && LIST_ITEM.test(lines[i]); i += 1) appendInline(list.appendChild(element("li")), lines[i].match(LIST_ITEM)[3]);
      continue;
    }
    if (line.startsWith(">")) {
      const quoted = [];
      for (; i < lines.length && lines[i].startsWith(">"); i += 1) quoted.push(lines[i].replace(/^>\s?/, ""));
      appendLines(root.appendChild(element("blockquote")), quoted);
      continue;
    }
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const paragraph = [];
    for (; i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i]) && !LIST_ITEM.test(lines[i]) && !lines[i].startsWith(">"); i += 1) {
      paragraph.push(lines[i]);
    }
    appendLines(root.appendChild(element("p")), paragraph);
  }
  return root;
}
