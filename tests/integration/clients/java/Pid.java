// pgjdbc: the backend PID the driver reports (PGConnection.getBackendPID(), from
// BackendKeyData) against pg_backend_pid(), the PID of a self-sent NOTIFY, and
// pg_terminate_backend(<that pid>) from a second connection ending exactly the first one.
// Usage: java -cp <classes>:<pgjdbc jar> Pid <jdbc url> <user> <password> <channel>
// Prints "key=value" lines on stdout; any failure exits non-zero with a stack trace.

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.Properties;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;

public final class Pid {
    private Pid() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 4 || !args[3].matches("[a-z_][a-z0-9_]*")) {
            throw new IllegalArgumentException("usage: Pid <jdbc url> <user> <password> <channel>");
        }
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        String channel = args[3];
        try (Connection victim = DriverManager.getConnection(args[0], props);
             Connection other = DriverManager.getConnection(args[0], props)) {
            int pid = victim.unwrap(PGConnection.class).getBackendPID();
            try (Statement st = victim.createStatement();
                 ResultSet rs = st.executeQuery("SELECT pg_backend_pid()")) {
                rs.next();
                System.out.println("pid_matches=" + (rs.getInt(1) == pid));
            }
            try (Statement st = victim.createStatement()) {
                st.execute("LISTEN " + channel);
                st.execute("NOTIFY " + channel + ", 'self'");
            }
            PGNotification[] notes = victim.unwrap(PGConnection.class).getNotifications(10000);
            System.out.println("notify_pid_matches="
                + (notes != null && notes.length == 1 && notes[0].getPID() == pid));
            try (Statement st = other.createStatement();
                 ResultSet rs = st.executeQuery("SELECT pg_terminate_backend(" + pid + ")")) {
                rs.next();
                System.out.println("terminated=" + rs.getBoolean(1));
            }
            String state = "none";
            for (int i = 0; i < 200 && state.equals("none"); i++) {
                try (Statement st = victim.createStatement()) {
                    st.execute("SELECT 1");
                    Thread.sleep(50);
                } catch (SQLException e) {
                    state = e.getSQLState();
                }
            }
            System.out.println("victim_error=" + state);
            System.out.println("victim_closed=" + victim.isClosed());
            try (Statement st = other.createStatement();
                 ResultSet rs = st.executeQuery("SELECT 1")) {
                rs.next();
                System.out.println("other_alive=" + (rs.getInt(1) == 1));
            }
        }
    }
}
