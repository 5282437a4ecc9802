// pgjdbc through sqlproxy: simple CRUD, a PreparedStatement executed past prepareThreshold (so the
// driver switches to a named server-side statement), a batch, a rolled-back transaction and an
// error that leaves the connection usable.
// Usage: java -cp <classes>:<pgjdbc jar> Compat <jdbc url> <user> <password> <table>
// Prints "key=value" lines on stdout; any failure exits non-zero with a stack trace.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

public final class Compat {
    private Compat() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 4 || !args[3].matches("[a-z_][a-z0-9_]*")) {
            throw new IllegalArgumentException("usage: Compat <jdbc url> <user> <password> <table>");
        }
        String url = args[0];
        String table = args[3];
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        try (Connection conn = DriverManager.getConnection(url, props)) {
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("SELECT current_user, 40 + 2")) {
                rs.next();
                System.out.println("user=" + rs.getString(1));
                System.out.println("answer=" + rs.getInt(2));
            }
            try (Statement st = conn.createStatement()) {
                st.execute("CREATE TABLE " + table
                    + " (id int PRIMARY KEY, name text NOT NULL, score int)");
            }
            try (PreparedStatement ins = conn.prepareStatement(
                    "INSERT INTO " + table + " (id, name, score) VALUES (?, ?, ?)")) {
                for (int i = 1; i <= 10; i++) {
                    ins.setInt(1, i);
                    ins.setString(2, "name-" + i);
                    ins.setInt(3, i * 10);
                    ins.executeUpdate();
                }
                for (int i = 11; i <= 20; i++) {
                    ins.setInt(1, i);
                    ins.setString(2, "batch-" + i);
                    ins.setInt(3, i * 10);
                    ins.addBatch();
                }
                int total = 0;
                for (int n : ins.executeBatch()) {
                    total += n;
                }
                System.out.println("batch=" + total);
            }
            List<String> seen = new ArrayList<>();
            try (PreparedStatement sel = conn.prepareStatement(
                    "SELECT name, score * 2 FROM " + table + " WHERE id = ?")) {
                // prepareThreshold defaults to 5: executions 5.. use a named server statement.
                for (int i = 1; i <= 10; i++) {
                    sel.setInt(1, i);
                    try (ResultSet rs = sel.executeQuery()) {
                        if (!rs.next()) {
                            throw new IllegalStateException("no row for id " + i);
                        }
                        String got = rs.getString(1) + ":" + rs.getInt(2);
                        if (!got.equals("name-" + i + ":" + (i * 20))) {
                            throw new IllegalStateException("id " + i + " returned " + got);
                        }
                        seen.add(got);
                    }
                }
            }
            System.out.println("prepared=" + String.join(",", seen));
            try (PreparedStatement upd = conn.prepareStatement(
                    "UPDATE " + table + " SET score = score + ? WHERE id <= ?")) {
                upd.setInt(1, 1);
                upd.setInt(2, 5);
                System.out.println("updated=" + upd.executeUpdate());
            }
            try (PreparedStatement del = conn.prepareStatement(
                    "DELETE FROM " + table + " WHERE id > ?")) {
                del.setInt(1, 15);
                System.out.println("deleted=" + del.executeUpdate());
            }
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.executeUpdate("INSERT INTO " + table + " (id, name) VALUES (999, 'rolled back')");
            }
            conn.rollback();
            conn.setAutoCommit(true);
            try (Statement st = conn.createStatement()) {
                st.executeUpdate("INSERT INTO " + table + " (id, name) VALUES (1, 'duplicate')");
                System.out.println("duplicate=no error");
            } catch (SQLException e) {
                System.out.println("duplicate=" + e.getSQLState());
            }
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery(
                     "SELECT count(*), sum(score) FROM " + table)) {
                rs.next();
                System.out.println("count=" + rs.getInt(1));
                System.out.println("sum=" + rs.getLong(2));
            }
        }
        System.out.println("done=ok");
    }
}
