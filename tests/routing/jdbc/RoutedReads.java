// pgjdbc through a routing sqlproxy: server-prepared statements (prepareThreshold reached, so the
// driver switches to a named statement it Binds again and again), a read-only transaction
// (setReadOnly: BEGIN READ ONLY), a write then reads of it, and the statements still working.
// Usage: java -cp <classes>:<pgjdbc jar> RoutedReads <jdbc url> <user> <password> <table>
// The table holds (id int, v text) rows 1..10 with v = 'v' || id.
// Prints "key=value" lines on stdout; any failure exits non-zero with a stack trace.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.Statement;
import java.util.Properties;

public final class RoutedReads {
    private RoutedReads() {}

    private static String one(PreparedStatement ps, int id) throws Exception {
        ps.setInt(1, id);
        try (ResultSet rs = ps.executeQuery()) {
            if (!rs.next()) {
                throw new IllegalStateException("no row for id " + id);
            }
            return rs.getString(1);
        }
    }

    private static void expect(String got, String want) {
        if (!got.equals(want)) {
            throw new IllegalStateException("expected " + want + ", got " + got);
        }
    }

    public static void main(String[] args) throws Exception {
        if (args.length != 4 || !args[3].matches("[a-z_][a-z0-9_]*")) {
            throw new IllegalArgumentException("usage: RoutedReads <jdbc url> <user> <password> <table>");
        }
        String table = args[3];
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        try (Connection conn = DriverManager.getConnection(args[0], props)) {
            int n = 0;
            try (PreparedStatement sel = conn.prepareStatement(
                    "SELECT v FROM " + table + " WHERE id = ?")) {
                for (int round = 0; round < 3; round++) {
                    for (int i = 1; i <= 10; i++) {
                        expect(one(sel, i), "v" + i);
                        n++;
                    }
                }
                System.out.println("autocommit_reads=" + n);
                conn.setAutoCommit(false);
                conn.setReadOnly(true);
                for (int i = 1; i <= 10; i++) {
                    expect(one(sel, i), "v" + i);
                }
                conn.commit();
                conn.setReadOnly(false);
                conn.setAutoCommit(true);
                System.out.println("read_only_tx=ok");
                try (PreparedStatement upd = conn.prepareStatement(
                        "UPDATE " + table + " SET v = ? WHERE id = ?")) {
                    for (int i = 1; i <= 6; i++) {
                        upd.setString(1, "w" + i);
                        upd.setInt(2, i);
                        upd.executeUpdate();
                        expect(one(sel, i), "w" + i);  // read-your-writes
                    }
                }
                System.out.println("read_your_writes=ok");
                Thread.sleep(500);  // the replica catches up: reads may go back to it
                for (int i = 1; i <= 10; i++) {
                    expect(one(sel, i), i <= 6 ? "w" + i : "v" + i);
                }
                System.out.println("after=ok");
            }
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("SELECT count(*) FROM " + table)) {
                rs.next();
                System.out.println("count=" + rs.getInt(1));
            }
        }
        System.out.println("done=ok");
    }
}
