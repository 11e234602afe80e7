// Conversations kept in the browser (IndexedDB), one record each:
// {id, title, created, updated, messages: [{role, content, attachments?, tool_calls?, stats?}]}.

const DATABASE = "mlx-gemma3n";
const STORE = "conversations";

function request(r) {
  return new Promise((resolve, reject) => {
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
  });
}

let opened = null;

function database() {
  if (!opened) {
    const open = indexedDB.open(DATABASE, 1);
    open.onupgradeneeded = () => open.result.createObjectStore(STORE, { keyPath: "id" });
    opened = request(open);
  }
  return opened;
}

async function store(mode) {
  return (await database()).transaction(STORE, mode).objectStore(STORE);
}

export async function listConversations() {
  const all = await request((await store("readonly")).getAll());
  return all.sort((a, b) => b.updated - a.updated);
}

export async function getConversation(id) {
  return request((await store("readonly")).get(id));
}

export async function saveConversation(conversation) {
  conversation.updated = Date.now();
  await request((await store("readwrite")).put(conversation));
}

export async function deleteConversation(id) {
  await request((await store("readwrite")).delete(id));
}

export function newConversation(title = "New conversation") {
  const now = Date.now();
  return { id: crypto.randomUUID(), title, created: now, updated: now, messages: [] };
}

// An export file: {"format": "mlx-gemma3n-conversations", "version": 1, "conversations": [...]}.
export const EXPORT_FORMAT = "mlx-gemma3n-conversations";

export function exportText(conversations) {
  return JSON.stringify({ format: EXPORT_FORMAT, version: 1, conversations }, null, 2);
}

// The conversations of an export file, checked; throws an Error naming what is wrong.
export function parseExport(text) {
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new Error("the file is not JSON");
  }
  if (!data || data.format !== EXPORT_FORMAT || !Array.isArray(data.conversations)) {
    throw new Error(`the file is not an export of this page (its "format" is not "${EXPORT_FORMAT}")`);
  }
  return data.conversations.map((c, i) => {
    if (typeof c.id !== "string" || typeof c.title !== "string" || !Array.isArray(c.messages)) {
      throw new Error(`conversation ${i + 1} needs an id, a title and messages`);
    }
    for (const m of c.messages) {
      if (!["system", "user", "assistant", "tool"].includes(m.role) || typeof m.content !== "string") {
        throw new Error(`conversation ${i + 1} has a message without a known role or text content`);
      }
    }
    return { created: Date.now(), updated: Date.now(), ...c };
  });
}
