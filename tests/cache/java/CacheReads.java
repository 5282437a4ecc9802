// pgjdbc through the result cache: the same point reads again and again (the driver switches
// to a named server-side statement after prepareThreshold executions), printed as key=value.
// Usage: java -cp <classes>:<pgjdbc jar> CacheReads <jdbc url> <user> <table>

import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.util.Properties;

public final class CacheReads {
    private CacheReads() {}

    public static void main(String[] args) throws Exception {
        if (args.length != 3 || !args[2].matches("[a-z_][a-z0-9_]*")) {
            throw new IllegalArgumentException("usage: CacheReads <jdbc url> <user> <table>");
        }
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        try (Connection conn = DriverManager.getConnection(args[0], props);
             PreparedStatement ps = conn.prepareStatement(
                 "SELECT id, v FROM " + args[2] + " WHERE id = ?")) {
            StringBuilder out = new StringBuilder();
            for (int i = 0; i < 12; i++) {
                ps.setInt(1, 1 + i % 3);
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) {
                        out.append(rs.getInt(1)).append(':').append(rs.getString(2)).append(',');
                    }
                }
            }
            System.out.println("rows=" + out);
        }
    }
}
