// node-postgres through sqlproxy: simple CRUD, parameterized and named (prepared) queries,
// a transaction rolled back, and an error that leaves the connection usable.
// Usage: node compat.js <connection string> <table name>. Prints one JSON object on stdout.
'use strict';

const { Client } = require('pg');

async function main() {
  const [connectionString, table] = process.argv.slice(2);
  if (!connectionString || !/^[a-z_][a-z0-9_]*$/.test(table || '')) {
    throw new Error('usage: node compat.js <connection string> <table>');
  }
  const client = new Client({ connectionString });
  await client.connect();
  const out = {};
  try {
    const ver = await client.query('SELECT current_user AS u, 1 + 1 AS two');
    out.user = ver.rows[0].u;
    out.two = ver.rows[0].two;

    await client.query(`CREATE TABLE ${table} (id int PRIMARY KEY, name text NOT NULL, score int)`);
    for (let i = 1; i <= 10; i++) {
      await client.query(`INSERT INTO ${table} (id, name, score) VALUES ($1, $2, $3)`,
        [i, `name-${i}`, i * 10]);
    }
    // A named statement: parsed once on the server, then only Bind/Execute.
    const named = [];
    for (let i = 1; i <= 10; i++) {
      const r = await client.query({
        name: 'compat_by_id',
        text: `SELECT id, name, score FROM ${table} WHERE id = $1`,
        values: [i],
      });
      named.push(r.rows[0]);
    }
    out.named = named;

    const upd = await client.query(`UPDATE ${table} SET score = score + $1 WHERE id <= $2`, [5, 3]);
    out.updated = upd.rowCount;
    const del = await client.query(`DELETE FROM ${table} WHERE id > $1`, [8]);
    out.deleted = del.rowCount;

    await client.query('BEGIN');
    await client.query(`INSERT INTO ${table} (id, name) VALUES (100, 'rolled back')`);
    await client.query('ROLLBACK');

    try {
      await client.query(`INSERT INTO ${table} (id, name) VALUES (1, 'duplicate')`);
      out.duplicate = 'no error';
    } catch (err) {
      out.duplicate = err.code;
    }

    const all = await client.query({
      text: `SELECT id, name, score FROM ${table} WHERE score >= $1 ORDER BY id`,
      values: [0],
      rowMode: 'array',
    });
    out.rows = all.rows;
    const multi = await client.query('SELECT 1 AS a; SELECT 2 AS b');
    out.multi = multi.map((r) => r.rows[0]);
  } finally {
    await client.end();
  }
  process.stdout.write(JSON.stringify(out) + '\n');
}

main().catch((err) => {
  process.stderr.write(`compat.js failed: ${err.stack || err}\n`);
  process.exit(1);
});
